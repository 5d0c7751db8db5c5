"""The hand-in (issue 22): the course's rules for hw3_1.sh / hw3_2.sh and what they exec, the
release package `python -m stages.handin` makes, hw3_download.sh fetching it with wget, the Python
that scripts/run_module.sh picks, and the real world's course files in stages/world.py. The whole
hand-in in a Python 3.8 / torch 1.12.1 venv is `make grading-check` (scripts/grading_check.sh)."""
import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from common.errors import run_stage
from tests.test_dvc_yaml import code_of

REPO = Path(__file__).resolve().parents[1]

# The HW3 spec, "Rules": hw3_1.sh and hw3_2.sh must not use these.
FORBIDDEN = ("rm", "sudo", "CUDA_VISIBLE_DEVICES", "cp", "mv", "mkdir", "cd", "pip")
WORD = re.compile(r"(?<![\w-])(" + "|".join(FORBIDDEN) + r")(?![\w-])")
ABSOLUTE_PATH = re.compile(r"""(?:^|[\s"'=:(<>|;&])(/[\w.~-]+(?:/[\w.~-]+)*)""")


def forbidden_words(text):
    """(line number, word) of each forbidden command named in `text`, as a word (pipefail is not
    pip), comments included: a grader's grep reads them too."""
    return [(i, m.group(1)) for i, line in enumerate(text.splitlines(), 1)
            for m in WORD.finditer(line)]


def hard_coded_paths(text):
    """(line number, path) of each absolute path in `text`, the #! line left out."""
    return [(i, m.group(1)) for i, line in enumerate(text.splitlines(), 1)
            if not (i == 1 and line.startswith("#!")) for m in ABSOLUTE_PATH.finditer(line)]


def executed_scripts(*scripts):
    """The scripts and every repository script they name (scripts/*.sh), transitively."""
    seen, todo = [], list(scripts)
    while todo:
        rel = todo.pop(0)
        if rel in seen:
            continue
        seen.append(rel)
        todo += re.findall(r"\bscripts/[\w.-]+\.sh\b", (REPO / rel).read_text(encoding="utf-8"))
    return seen


HAND_IN_SCRIPTS = executed_scripts("hw3_1.sh", "hw3_2.sh")


def test_the_hand_in_scripts_include_what_they_exec():
    assert HAND_IN_SCRIPTS == ["hw3_1.sh", "hw3_2.sh", "scripts/run_module.sh"]


@pytest.mark.parametrize("rel", HAND_IN_SCRIPTS)
def test_a_hand_in_script_uses_no_forbidden_command_nor_a_fixed_path(rel):
    text = (REPO / rel).read_text(encoding="utf-8")
    assert not forbidden_words(text), f"{rel}: {forbidden_words(text)}"
    assert not hard_coded_paths(text), f"{rel}: {hard_coded_paths(text)}"


def test_hw3_download_fixes_no_path_and_fetches_as_the_course_says():
    text = (REPO / "hw3_download.sh").read_text(encoding="utf-8")
    assert not hard_coded_paths(text), hard_coded_paths(text)
    assert not forbidden_words(text), forbidden_words(text)
    assert re.search(r"^RELEASE_URL=", text, re.M) and re.search(r"^RELEASE_SHA256=", text, re.M)
    for command in ("wget --no-verbose -O", "sha256sum --check", "tar zxf", "stages.hw3_prefetch"):
        assert command in text


def test_the_checks_find_what_they_look_for():
    script = ('set -euo pipefail\nROOT="$(cd "$(dirname "$0")" && pwd)"\nrm -rf out # abcd\n'
              'CUDA_VISIBLE_DEVICES=0 python3 x.py\n.venv/bin/pip install y\nmkdir-ish --cp\n')
    assert [w for _, w in forbidden_words(script)] == ["cd", "rm", "CUDA_VISIBLE_DEVICES", "pip"]
    assert hard_coded_paths('#!/usr/bin/env bash\nexec "${ROOT}/.venv/bin/python" a\n') == []
    assert [p for _, p in hard_coded_paths('X=/home/me/hw3\npython3 "/work/a.py"\n')] == \
        ["/home/me/hw3", "/work/a.py"]


# ----------------------------------------------------------------------- scripts/run_module.sh

def fake_root(tmp_path, venv=False):
    """A repository folder with run_module.sh and a stages/probe.py that names its Python."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts/run_module.sh", root / "scripts")
    (root / "stages").mkdir()
    (root / "stages/__init__.py").write_text("")
    (root / "stages/probe.py").write_text(
        "import os, sys\nprint(os.environ.get('WHO', sys.executable), sys.argv[1:], "
        "os.environ['HF_HUB_OFFLINE'])\n")
    if venv:
        (root / ".venv/bin").mkdir(parents=True)
        wrapper = root / ".venv/bin/python"
        wrapper.write_text(f'#!/bin/sh\nWHO=venv exec "{sys.executable}" "$@"\n')
        wrapper.chmod(0o755)
    return root


def probe(root, tmp_path, **env):
    bin_dir = tmp_path / "bin"   # a python3 first on PATH, as the grading environment's
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nWHO=path-python3 exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("HW3_PYTHON", "HF_HUB_OFFLINE")}
    result = subprocess.run(["bash", "repo/scripts/run_module.sh", "stages.probe", "a b"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_run_module_takes_hw3_python_then_the_venv_then_python3(tmp_path):
    assert probe(fake_root(tmp_path), tmp_path) == "path-python3 ['a b'] 1"
    shutil.rmtree(tmp_path / "repo")
    assert probe(fake_root(tmp_path, venv=True), tmp_path) == "venv ['a b'] 1"
    assert probe(tmp_path / "repo", tmp_path, HW3_PYTHON=sys.executable,
                 HF_HUB_OFFLINE="0") == f"{sys.executable} ['a b'] 0"


def test_run_module_names_a_python_that_is_not_there(tmp_path):
    """exit 1 and one line naming it (the scripts' fatal status), not bash's 127."""
    fake_root(tmp_path)
    for python in (str(tmp_path / "no-python"), "no-such-python3"):
        result = subprocess.run(["bash", "repo/scripts/run_module.sh", "stages.probe"], cwd=tmp_path,
                                capture_output=True, text=True,
                                env={**os.environ, "HW3_PYTHON": python})
        assert result.returncode == 1, result
        assert result.stderr == f"error: {python}: no such Python program (set HW3_PYTHON to one)\n"


# ----------------------------------------------------------------------------- stages.handin

def byte_level_vocab(folder):
    from captioning.tokenizer import EOT, bytes_to_unicode
    symbols = list(bytes_to_unicode().values())
    (folder / "encoder.json").write_text(json.dumps({**{s: i for i, s in enumerate(symbols)},
                                                     EOT: len(symbols)}))
    (folder / "vocab.bpe").write_text("#version: 0.2\n")


@pytest.fixture
def pipeline(tmp_path):
    """A repository folder after `dvc repro select` in miniature: release/ (a tiny captioner
    checkpoint made for the CLIP file data/demo/clip_demo.pt and the release's vocabulary),
    params.yaml naming that CLIP for zero-shot, and a copy of hw3_download.sh."""
    from captioning.checkpoint import save_trainable
    from captioning.tokenizer import Tokenizer
    from evaluation.encoders import EncoderConfig, encoder_id
    from tests.test_decoding import tiny_model
    from tests.tiny_world import tiny_clip

    root = tmp_path / "pipeline"
    release = root / "release"
    release.mkdir(parents=True)
    (root / "data/demo").mkdir(parents=True)
    tiny_clip(root / "data/demo/clip_demo.pt")
    byte_level_vocab(release)
    encoder = {"kind": "clip", "name": "data/demo/clip_demo.pt"}
    model = tiny_model("gated_cross", "lora")
    model.config = dataclasses.replace(
        model.config,
        encoder_id=encoder_id(EncoderConfig(kind="clip", name=str(root / encoder["name"]))),
        tokenizer_id=Tokenizer.from_files(release / "encoder.json", release / "vocab.bpe").identity)
    save_trainable(model, release / "captioner.safetensors")
    (release / "selected.json").write_text(json.dumps(
        {"variant": "lora", "scores": {"cider": 1.0}, "encoder": encoder,
         "decode": {"method": "beam", "beam_size": 2}, "decoder_heads": 2}))
    (root / "params.yaml").write_text(json.dumps({"zeroshot": {"clip": "data/demo/clip_demo.pt"}}))
    shutil.copy(REPO / "hw3_download.sh", root / "hw3_download.sh")
    return root


def handin(root, *extra):
    from stages import handin as module
    module.main(["--pipeline", str(root), "--out", str(root / "handin"),
                 "--download-script", str(root / "hw3_download.sh"), *extra])
    return root / "handin/release.tar.gz"


def stage_error(root, *extra):
    """The one line run_stage prints for a refused package (its exit message)."""
    with pytest.raises(SystemExit) as e:
        run_stage(lambda: handin(root, *extra))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


URL = "https://example.org/hw3/release.tar.gz"
MEMBERS = ["data/demo/clip_demo.pt", "release/captioner.safetensors", "release/encoder.json",
           "release/selected.json", "release/vocab.bpe"]


def test_handin_packs_the_release_and_its_local_models_in_deterministic_bytes(pipeline):
    script = pipeline / "hw3_download.sh"
    script.chmod(0o755)
    before = script.read_text()
    archive = handin(pipeline, "--url", URL)
    first = archive.read_bytes()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == MEMBERS
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == \
            {(0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}
        for m in members:
            assert tar.extractfile(m).read() == (pipeline / m.name).read_bytes()
    assert first[:2] == b"\x1f\x8b" and first[4:8] == bytes(4) and not first[3] & 0x08  # no time, no name
    digest = hashlib.sha256(first).hexdigest()
    assert (pipeline / "handin/release.sha256").read_text() == f"{digest}  release.tar.gz\n"

    after = script.read_text()
    assert f"RELEASE_URL='{URL}'\n" in after and f"RELEASE_SHA256='{digest}'\n" in after
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert [a.split("=")[0] for a, _ in changed] == ["RELEASE_URL", "RELEASE_SHA256"]
    assert script.stat().st_mode & 0o777 == 0o755

    for path in pipeline.rglob("*"):   # other times, same contents: the same bytes
        os.utime(path, (1e9, 1e9))
    assert handin(pipeline).read_bytes() == first
    assert f"RELEASE_URL='{URL}'\n" in script.read_text()   # no --url: the URL line is kept


def test_handin_leaves_named_models_to_the_prefetch(pipeline):
    (pipeline / "params.yaml").write_text(json.dumps({"zeroshot": {"clip": "ViT-B/32"}}))
    with tarfile.open(handin(pipeline)) as tar:
        assert tar.getnames() == MEMBERS   # the captioner's encoder is still the local file
    assert "RELEASE_URL=''" in (pipeline / "hw3_download.sh").read_text()


def test_handin_refuses_too_many_trainable_parameters(pipeline, monkeypatch):
    from captioning.checkpoint import read_checkpoint
    from stages import handin as module
    count = sum(t.numel() for t in read_checkpoint(pipeline / "release/captioner.safetensors")[1].values())
    monkeypatch.setattr(module, "MAX_TRAINABLE", count)
    message = stage_error(pipeline, "--url", URL)
    assert f"captioner.safetensors: {count:,} trainable parameters; the course allows fewer " \
           f"than {count:,}" in message
    assert not (pipeline / "handin").exists() and "RELEASE_URL=''" in (pipeline / "hw3_download.sh").read_text()


@pytest.mark.parametrize("change, message", [
    (lambda root: (root / "params.yaml").write_text(json.dumps(
        {"zeroshot": {"clip": str(root / "data/demo/clip_demo.pt")}})),
     "zeroshot.clip: /"),
    (lambda root: (root / "release/vocab.bpe").unlink(), "release: no vocab.bpe: run `dvc repro select`"),
    (lambda root: torch.save({"w": torch.zeros(1)}, root / "data/demo/clip_demo.pt"),
     "image encoder data/demo/clip_demo.pt is not the one"),
    (lambda root: (root / "params.yaml").write_text(json.dumps({"zeroshot": {"clip": "nope.pt"}})),
     "nope.pt: no such file (and not a model name)"),
])
def test_handin_names_what_it_cannot_pack(pipeline, change, message):
    change(pipeline)
    got = stage_error(pipeline)
    assert message in got, got


def test_handin_refuses_a_url_wget_cannot_take(pipeline):
    for url in ("example.org/release.tar.gz", "https://x/a b", "https://x/it's"):
        assert "--url" in stage_error(pipeline, "--url", url)


# --------------------------------------------------------------------------- hw3_download.sh

@pytest.fixture
def served(pipeline, tmp_path):
    """The pipeline's release served on 127.0.0.1 as handin packed it, and a repository folder
    (the hand-in's code, linked; no release) whose hw3_download.sh points at it."""
    (pipeline / "handin").mkdir()
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                               "--directory", str(pipeline / "handin")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(re.search(r"port (\d+)", server.stdout.readline()).group(1))
        repo = tmp_path / "repo"
        for rel in code_of("stages.hw3_prefetch") | {"scripts/run_module.sh"}:
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, repo / rel)
        shutil.copy(REPO / "hw3_download.sh", repo)
        shutil.copy(pipeline / "params.yaml", repo)
        handin(pipeline, "--url", f"http://127.0.0.1:{port}/release.tar.gz",
               "--download-script", str(repo / "hw3_download.sh"))
        yield repo
    finally:
        server.terminate()
        server.wait()


def download(repo):
    """bash hw3_download.sh from the repository folder, as the graders run it."""
    return subprocess.run(["bash", "hw3_download.sh"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "HW3_PYTHON": sys.executable})


@pytest.mark.skipif(shutil.which("wget") is None, reason="wget is not installed")
def test_hw3_download_fetches_checks_unpacks_and_prefetches(served, pipeline):
    result = download(served)
    assert result.returncode == 0, result.stderr
    assert "sha256 OK" in result.stdout and result.stdout.count("ready: ") == 2
    for name in MEMBERS:
        assert (served / name).read_bytes() == (pipeline / name).read_bytes()


@pytest.mark.skipif(shutil.which("wget") is None, reason="wget is not installed")
def test_hw3_download_refuses_an_archive_of_other_bytes(served, pipeline):
    archive = pipeline / "handin/release.tar.gz"
    with gzip.open(archive, "rb") as f:
        inner = f.read()
    archive.write_bytes(gzip.compress(inner))   # same contents, other bytes
    result = download(served)
    assert result.returncode == 1 and "is not the release `make handin` packed" in result.stderr
    assert not (served / "release").exists()


def test_hw3_download_says_when_no_url_was_set(tmp_path):
    shutil.copy(REPO / "hw3_download.sh", tmp_path)
    result = download(tmp_path)
    assert result.returncode == 1 and "RELEASE_URL is not set" in result.stderr
    assert "make handin URL=" in result.stderr


# ------------------------------------------------------------------ stages.world: course files

def course_tree(tmp_path, where=".."):
    course = tmp_path / "course"
    data = course / "hw3_data"
    for part in ("p1_data", "p2_data", "p3_data"):
        (data / part).mkdir(parents=True)
    (data / "p2_data/decoder_model.bin").write_bytes(b"x")
    for name in ("encoder.json", "vocab.bpe"):
        (data / where / name).write_text("{}")
    return data


def switch(tmp_path, monkeypatch, *argv):
    from stages import world
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    monkeypatch.chdir(REPO)   # worlds/ is read from the repository root
    world.main(["real", "--params", str(params), *argv])
    import yaml
    return yaml.safe_load(params.read_text())["world"]


@pytest.mark.parametrize("where", ["..", "p2_data"])
def test_the_real_world_finds_the_course_files_where_the_course_puts_them(tmp_path, monkeypatch, where):
    data = course_tree(tmp_path, where)
    got = switch(tmp_path, monkeypatch, "--data-root", str(data))
    folder = data.parent if where == ".." else data / where
    assert got["encoder_json"] == str(folder / "encoder.json")
    assert got["vocab_bpe"] == str(folder / "vocab.bpe")
    assert got["decoder"] == str(data / "p2_data/decoder_model.bin")
    assert got["data_root"] == str(data) and got["clip"] == "ViT-B/32"


def test_the_real_world_takes_flags_and_says_what_is_missing(tmp_path, monkeypatch):
    data = course_tree(tmp_path)
    (data.parent / "vocab.bpe").unlink()
    (data / "p2_data/decoder_model.bin").unlink()
    with pytest.raises(SystemExit) as e:
        switch(tmp_path, monkeypatch, "--data-root", str(data))
    lines = str(e.value.code).splitlines()
    assert len(lines) == 2 and "vocab.bpe not found" in lines[0] and "--vocab-bpe PATH" in lines[0]
    assert "decoder_model.bin not found" in lines[1] and str(data / "p2_data") in lines[1]
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "vocab.bpe").write_text("")
    (other / "decoder.bin").write_bytes(b"x")
    got = switch(tmp_path, monkeypatch, "--data-root", str(data), "--vocab-bpe",
                 str(other / "vocab.bpe"), "--decoder", str(other / "decoder.bin"))
    assert got["vocab_bpe"] == str(other / "vocab.bpe") and got["decoder"] == str(other / "decoder.bin")
    with pytest.raises(SystemExit, match="--encoder-json nothere.json: no such file"):
        switch(tmp_path, monkeypatch, "--data-root", str(data), "--vocab-bpe",
               str(other / "vocab.bpe"), "--decoder", str(other / "decoder.bin"),
               "--encoder-json", "nothere.json")
