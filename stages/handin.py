"""Package the hand-in: the release archive a student uploads, its sha256, and the two lines of
hw3_download.sh that fetch it.

    python -m stages.handin --url https://host/path/release.tar.gz     (or: make handin URL=...)

Writes
  handin/release.tar.gz   release/ (captioner.safetensors, encoder.json, vocab.bpe, selected.json)
                          and every LOCAL model file hw3_1.sh and hw3_2.sh load that cannot be
                          downloaded by name (the demo world's CLIP: params.yaml `zeroshot.clip`
                          and the released image encoder), at their paths in the repository;
                          named models (ViT-B/32, a timm model) are fetched by hw3_download.sh's
                          prefetch instead. Deterministic bytes: members sorted, mtime 0, uid/gid
                          0, mode 0644, gzip header without name or time, so that packing the same
                          release again gives the same file and the same sha256.
  handin/release.sha256   `sha256  release.tar.gz`, as sha256sum writes it
  hw3_download.sh         its RELEASE_URL= and RELEASE_SHA256= lines, rewritten in place
                          (atomically, the file's mode kept); nothing else in it changes.
Then upload handin/release.tar.gz to the URL (a direct download link: wget must get the file
itself) and commit hw3_download.sh. Without --url the URL line is kept as it is: pack first, upload,
then run again with --url once the link is known (the same bytes, the same sha256).

The trainable-parameter count (the course's rule: fewer than 35M) is taken from the checkpoint's
tensors, which are exactly the trainable ones, and checked here. Every refusal is one line naming
the file and the problem (common/errors.py).
"""
import argparse
import gzip
import hashlib
import re
import tarfile
from pathlib import Path, PurePosixPath

from common.atomic import atomic_path
from common.errors import InputError, read_json, run_stage
from common.params import from_section, load_params

ROOT = Path(__file__).resolve().parent.parent
MAX_TRAINABLE = 35_000_000   # the course's limit: fewer than this
RELEASE_FILES = ("captioner.safetensors", "encoder.json", "vocab.bpe", "selected.json")
ARCHIVE, CHECKSUM = "release.tar.gz", "release.sha256"
URL = re.compile(r"(https?|ftp)://[^\s'\"\\]+")


class HandinError(InputError, ValueError):
    pass


def trainable_parameters(checkpoint, limit=None):
    """(config, number of parameters) of a trainable checkpoint; HandinError at `limit` (default
    MAX_TRAINABLE) or more."""
    from captioning.checkpoint import read_checkpoint
    limit = MAX_TRAINABLE if limit is None else limit
    config, tensors, _ = read_checkpoint(checkpoint)   # CheckpointError (an InputError) names it
    count = sum(t.numel() for t in tensors.values())
    if count >= limit:
        raise HandinError(f"{checkpoint}: {count:,} trainable parameters; the course allows fewer "
                          f"than {limit:,}")
    return config, count


def clip_names():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # clip imports pkg_resources, which warns on import
        import clip
    return set(clip.available_models())


def local_file(pipeline, value, what):
    """The repository-relative path (a str) of a model file that must travel in the archive;
    HandinError when it is absolute, outside the repository or missing."""
    path = PurePosixPath(value)
    if path.is_absolute():
        raise HandinError(f"{what}: {value} is an absolute path, which the grading machine does not "
                          "have: put the file in the repository and name it relative to it")
    if ".." in path.parts:
        raise HandinError(f"{what}: {value} is outside the repository")
    if not (pipeline / path).is_file():
        raise HandinError(f"{what}: {pipeline / path}: no such file (and not a model name)")
    return path.as_posix()


def model_files(pipeline, params_path, selected_path, selected):
    """Repository-relative paths of the local model files hw3_1.sh and hw3_2.sh load, and the
    released encoder's config with its paths made absolute against `pipeline`."""
    from evaluation.encoders import EncoderConfig
    from evaluation.zeroshot import ZeroShotConfig
    names = clip_names()
    files = set()
    params = load_params(params_path)
    if "zeroshot" not in params:
        raise HandinError(f"{params_path}: no zeroshot section (hw3_1.sh reads it)")
    zeroshot = ZeroShotConfig.from_params(params["zeroshot"], source=str(params_path))
    if zeroshot.clip not in names:
        files.add(local_file(pipeline, zeroshot.clip, f"{params_path}: zeroshot.clip"))
    encoder = from_section(EncoderConfig, selected["encoder"], f"{selected_path}: encoder")
    if encoder.kind == "clip" and encoder.name not in names:
        files.add(local_file(pipeline, encoder.name, f"{selected_path}: encoder.name"))
        encoder.name = str(pipeline / encoder.name)
    if encoder.kind == "timm" and encoder.weights is not None:
        files.add(local_file(pipeline, encoder.weights, f"{selected_path}: encoder.weights"))
        encoder.weights = str(pipeline / encoder.weights)
    return sorted(files), encoder


def check_release(release, params_path, pipeline):
    """Check release/ and find what travels with it: (members {arcname: path}, trainable count)."""
    from captioning.tokenizer import Tokenizer
    from evaluation.encoders import encoder_id
    missing = [name for name in RELEASE_FILES if not (release / name).is_file()]
    if missing:
        raise HandinError(f"{release}: no {', '.join(missing)}: run `dvc repro select` (or "
                          "`make pull-release`) first")
    selected_path = release / "selected.json"
    selected = read_json(selected_path, "missing", HandinError)
    if not isinstance(selected, dict) or not {"encoder", "decode"} <= selected.keys():
        raise HandinError(f"{selected_path}: no 'encoder' or 'decode' entry: re-run `dvc repro select`")
    config, count = trainable_parameters(release / "captioner.safetensors")
    try:
        tokenizer = Tokenizer.from_files(release / "encoder.json", release / "vocab.bpe")
    except (OSError, ValueError) as e:   # they name the file
        raise HandinError(str(e)) from None
    if tokenizer.identity != config.tokenizer_id:
        raise HandinError(f"{release}: encoder.json/vocab.bpe are not the checkpoint's vocabulary")
    files, encoder = model_files(pipeline, params_path, selected_path, selected)
    if encoder_id(encoder) != config.encoder_id:
        raise HandinError(f"{selected_path}: image encoder {selected['encoder'].get('name')} is not the one "
                          f"{release / 'captioner.safetensors'} was trained on "
                          f"({config.encoder_id}): re-run `dvc repro`")
    members = {f"release/{name}": release / name for name in RELEASE_FILES}
    members.update({f: pipeline / f for f in files})
    return members, count


def write_archive(path, members):
    """A .tar.gz of `members` {arcname: source file} whose bytes depend on the contents alone."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for arcname in sorted(members):
            info = tarfile.TarInfo(arcname)
            info.size = members[arcname].stat().st_size
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
            with open(members[arcname], "rb") as f:
                tar.addfile(info, f)


def sha256_of(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def set_download_lines(script, url, sha256):
    """Rewrite the RELEASE_URL= (when `url` is given) and RELEASE_SHA256= lines of `script`;
    returns the URL it now holds."""
    try:
        text = script.read_text(encoding="utf-8")
    except OSError as e:
        raise HandinError(f"{script}: cannot read ({e.strerror or e})") from None
    values = {"RELEASE_SHA256": sha256}
    if url is not None:
        values["RELEASE_URL"] = url
    for name in ("RELEASE_URL", "RELEASE_SHA256"):
        found = re.findall(rf"^{name}=.*$", text, flags=re.M)
        if len(found) != 1:
            raise HandinError(f"{script}: expected one line starting `{name}=`, found {len(found)}")
    for name, value in values.items():
        text = re.sub(rf"^{name}=.*$", lambda _: f"{name}='{value}'", text, flags=re.M)
    mode = script.stat().st_mode & 0o7777
    with atomic_path(script, mode) as tmp:   # git tracks the script's x bit
        tmp.write_text(text, encoding="utf-8")
    return re.search(r"^RELEASE_URL='?([^'\n]*)'?$", text, flags=re.M).group(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="where handin/release.tar.gz will be downloaded from (http, "
                                  "https or ftp; wget must get the file itself)")
    ap.add_argument("--pipeline", default=str(ROOT),
                    help="the folder whose release/ and model files are packed (default: this "
                         "repository)")
    ap.add_argument("--params", help="params.yaml for zeroshot.clip (default: PIPELINE/params.yaml)")
    ap.add_argument("--out", default=str(ROOT / "handin"), help="where the archive goes")
    ap.add_argument("--download-script", default=str(ROOT / "hw3_download.sh"),
                    help="the hw3_download.sh whose two lines are set")
    args = ap.parse_args(argv)
    if args.url is not None and not URL.fullmatch(args.url):
        raise HandinError(f"--url {args.url!r}: expected an http://, https:// or ftp:// address "
                          "without spaces or quotes")
    pipeline = Path(args.pipeline).resolve()
    params = Path(args.params) if args.params else pipeline / "params.yaml"
    members, count = check_release(pipeline / "release", params, pipeline)
    out = Path(args.out)
    write_archive(out / ARCHIVE, members)
    digest = sha256_of(out / ARCHIVE)
    with atomic_path(out / CHECKSUM) as tmp:
        tmp.write_text(f"{digest}  {ARCHIVE}\n", encoding="utf-8")
    url = set_download_lines(Path(args.download_script), args.url, digest)
    size = (out / ARCHIVE).stat().st_size
    print(f"{out / ARCHIVE}: {size / 2**20:.1f} MiB, sha256 {digest}; {count:,} trainable "
          f"parameters (fewer than {MAX_TRAINABLE:,})")
    for arcname in sorted(members):
        print(f"  {arcname}")
    if url:
        print(f"{args.download_script}: fetches it from {url}: upload {out / ARCHIVE} there and "
              "commit the script")
    else:
        print(f"{args.download_script}: RELEASE_URL is not set yet: upload {out / ARCHIVE}, then "
              "run again with --url URL (same bytes, same sha256)")


if __name__ == "__main__":
    run_stage(main)
