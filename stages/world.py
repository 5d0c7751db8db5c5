"""The `world:` section of params.yaml, and the command that switches it between the demo world
and the course's real world:

    python -m stages.world real --data-root /path/to/hw3_data
        [--encoder-json PATH] [--vocab-bpe PATH] [--decoder PATH]
    python -m stages.world demo

Every key of worlds/<name>.yaml replaces the same key of params.yaml (comments and the other
keys are kept); then `dvc repro` re-runs what depends on the changed values.

The real world's text files are found where the course puts them: encoder.json and vocab.bpe at
the top of the course's repository (the folder that holds hw3_data/; also looked for inside
hw3_data/ and hw3_data/p2_data/), decoder_model.bin in hw3_data/p2_data/. The flags name them
instead; a file found nowhere stops the switch with one line saying where it looked.
"""
import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_open
from common.errors import run_stage


@dataclass
class World:
    """Where the data and the pretrained weights are: the demo world and the course's real world
    differ only here (README, "The two worlds")."""
    data_root: str
    decoder: str  # decoder_model.bin in the course format
    decoder_heads: int  # GPT-2's head count cannot be read off its tensors
    encoder_json: str
    vocab_bpe: str
    clip: str  # CLIP for zero-shot and CLIPScore: a name ("ViT-B/32") or a state-dict file

    def captions(self, split):
        """The captions file of p2 split `split` (train, val)."""
        return Path(self.data_root) / "p2_data" / f"{split}.json"

    def image_dir(self, split):
        if split == "p3":
            return Path(self.data_root) / "p3_data" / "images"
        return Path(self.data_root) / "p2_data" / "images" / split


# {placeholder in worlds/*.yaml: (file name, where the course puts it relative to hw3_data/ first)}
COURSE_FILES = {
    "encoder_json": ("encoder.json", ("..", ".", "p2_data")),
    "vocab_bpe": ("vocab.bpe", ("..", ".", "p2_data")),
    "decoder": ("decoder_model.bin", ("p2_data",)),
}


def course_files(data_root, given, needed):
    """{placeholder: path} of the course files `needed` (placeholders of COURSE_FILES): `given`
    (the flags, by placeholder) where set, else the first place the course puts each. Paths are
    built from `data_root` as written (a relative root gives relative paths). Exits with one
    line per missing file."""
    root, found, problems = Path(data_root), {}, []
    for key in needed:
        name, places = COURSE_FILES[key]
        flag = "--" + key.replace("_", "-")
        if given.get(key):
            if Path(given[key]).is_file():
                found[key] = str(given[key])
            else:
                problems.append(f"{flag} {given[key]}: no such file")
            continue
        candidates = [root / place / name if place != "." else root / name for place in places]
        candidates = [Path(os.path.normpath(c)) for c in candidates]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            problems.append(f"{name} not found (looked at {', '.join(map(str, candidates))}): "
                            f"the course ships it there; name it with {flag} PATH")
        else:
            found[key] = str(hit)
    if problems:
        sys.exit("\n".join(problems))
    return found


def merge(target, overrides, fill):
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value, fill)
        else:
            target[key] = value.format(**fill) if isinstance(value, str) else value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", help="a file name in worlds/: demo or real")
    ap.add_argument("--data-root", help="the course's hw3_data folder (real world)")
    ap.add_argument("--encoder-json", help="GPT-2's encoder.json (default: found where the course "
                                           "puts it, beside hw3_data/)")
    ap.add_argument("--vocab-bpe", help="GPT-2's vocab.bpe (default: beside hw3_data/)")
    ap.add_argument("--decoder", help="the course's decoder_model.bin (default: "
                                      "hw3_data/p2_data/decoder_model.bin)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    source = Path("worlds") / f"{args.world}.yaml"
    if not source.is_file():
        sys.exit(f"{source}: no such world (have {sorted(p.stem for p in Path('worlds').glob('*.yaml'))})")
    text = source.read_text(encoding="utf-8")
    fill = {"data_root": str(args.data_root).rstrip("/")}
    if "{data_root}" in text:
        if not args.data_root:
            sys.exit(f"{source} needs --data-root (the hw3_data folder)")
        root = Path(args.data_root)
        for part in ("p1_data", "p2_data", "p3_data"):
            if not (root / part).is_dir():
                sys.exit(f"{root}: no {part}/ inside: not the course's hw3_data folder")
    needed = [key for key in COURSE_FILES if "{" + key + "}" in text]
    if needed:
        fill.update(course_files(fill["data_root"], vars(args), needed))
    from ruamel.yaml import YAML   # DVC's own YAML library: it keeps comments and layout
    yaml = YAML()
    yaml.preserve_quotes = True
    params = yaml.load(Path(args.params).read_text(encoding="utf-8"))
    merge(params, yaml.load(text), fill)
    with atomic_open(args.params, "w", encoding="utf-8") as f:
        yaml.dump(params, f)
    print(f"{args.params}: switched to the {args.world} world; now run `dvc repro`")


if __name__ == "__main__":
    run_stage(main)
