"""Interrupted stages and reruns, on a tiny world, each stage run as DVC runs it (a subprocess in
the world's folder): a killed `extract` or `train` leaves nothing a later stage could trust, and
running it again gives byte-identical outputs; two runs from scratch give identical metrics; a
stage stopped by bad input keeps its previous outputs; outputs never replace inputs."""
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from common.atomic import atomic_dir, atomic_path, check_writable
from tests.test_captioner import build, course_sd  # noqa: F401 (a fixture)
from tests.tiny_world import build_tiny_world

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
BULK_COPIES = 12  # the `bulk` split: 12 x the train images, so extraction takes long enough to kill


def stage(world, *args):
    """Run `python -m stages.<args>` in `world` to completion."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=world, env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def start(world, *args):
    return subprocess.Popen([sys.executable, "-m", *args], cwd=world, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def snapshot(folder, pattern="*"):
    """Copy of the files matching `pattern` in `folder`, to compare a later run against."""
    copy = folder.parent / f"{folder.name}.reference"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for f in folder.glob(pattern):
        shutil.copy2(f, copy / f.name)
    return copy


def tree_bytes(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_same_files(reference, folder):
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names
    _, mismatch, errors = filecmp.cmpfiles(reference, folder, names, shallow=False)
    assert not mismatch and not errors, mismatch + errors


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = build_tiny_world(tmp_path_factory.mktemp("reliability"))
    train_dir = root / "hw3_data/p2_data/images/train"
    bulk = root / "hw3_data/bulk"
    bulk.mkdir()
    for image in train_dir.iterdir():
        for k in range(BULK_COPIES):
            shutil.copyfile(image, bulk / f"{image.stem}_{k}{image.suffix}")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["extract"]["splits"]["bulk"] = "bulk"
    params["train"].update(epochs=4, batch_size=4)   # epochs 2-4 give time to kill after epoch 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_killed_extraction_leaves_no_output_and_rerun_is_identical(world):
    features = world / "features"
    stage(world, "stages.extract")
    reference = snapshot(features)

    proc = start(world, "stages.extract")
    deadline = time.time() + 120
    while not list(features.glob(".tmp-bulk.h5-*")):   # bulk comes after train, val and p3
        assert proc.poll() is None, "extract finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.002)
    kill(proc)
    # the previous run's files were removed first, the interrupted one never became bulk.h5
    assert not (features / "bulk.h5").exists() and not (features / "clipscore_val.h5").exists()
    assert list(features.glob(".tmp-bulk.h5-*"))    # only an unmistakable leftover remains

    stage(world, "stages.extract")
    assert_same_files(reference, features)           # leftover removed, every file byte-identical


def test_killed_training_leaves_no_checkpoint_and_rerun_is_identical(world):
    if not (world / "features/train.h5").exists():
        stage(world, "stages.extract")
    # the curves (live/train/lora/plots) grow during training, for a live view; the files a later
    # stage reads appear only at the end
    outputs = [world / "checkpoints/lora/model.safetensors", world / "live/train/lora/metrics.json",
               world / "logs/train/lora.json"]
    stage(world, "stages.train", "--variant", "lora")
    reference = snapshot(world / "checkpoints/lora")
    curves = tree_bytes(world / "live/train/lora")
    assert json.loads((world / "live/train/lora/metrics.json").read_text())["epoch"] == 4

    proc = start(world, "stages.train", "--variant", "lora")
    for line in proc.stdout:
        if line.startswith("epoch 1:"):
            break
    assert proc.poll() is None, "training finished before it could be killed"
    kill(proc)
    assert not any(p.exists() for p in outputs)     # not even the best epoch so far

    stage(world, "stages.train", "--variant", "lora")
    assert_same_files(reference, world / "checkpoints/lora")
    assert tree_bytes(world / "live/train/lora") == curves


def test_two_runs_from_scratch_give_identical_metrics(tmp_path):
    """Everything built twice, in two folders: the world, its features, training, decoding and
    scores. The metric files and the captions must be byte-identical."""
    runs = [build_tiny_world(tmp_path / name) for name in ("first", "second")]
    for run in runs:
        stage(run, "stages.extract")
        stage(run, "stages.train", "--variant", "lora")
        stage(run, "stages.decode", "--variant", "lora")
        stage(run, "stages.score", "--variant", "lora")
    first, second = runs
    metrics = json.loads((first / "metrics/lora.json").read_text())
    assert metrics["cider"] >= 0 and "cider_blind" in metrics
    for rel in ("metrics/lora.json", "live/train/lora/metrics.json",
                "live/train/lora/plots/metrics/val/cider.tsv", "predictions/lora/val.json",
                "predictions/lora/p3.json", "predictions/lora/val_blind.json"):
        assert (first / rel).read_text() == (second / rel).read_text(), rel


def failed_stage(world, params, *args):
    """Run `python -m stages.<args> --params params` in `world`; it must fail. Returns stderr."""
    result = subprocess.run([sys.executable, "-m", *args, "--params", str(params)], cwd=world,
                            env=ENV, capture_output=True, text=True)
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stderr


@pytest.mark.parametrize("section, change, message", [
    ("peft", {"lora": {"rank": 0}}, "bad.yaml: peft.lora: peft.lora.rank=0: must be at least 1"),
    ("peft", {"lora": {"rnak": 8}}, "bad.yaml: peft.lora: unknown parameter(s) ['rnak']"),
    ("peft", {"rank": 8}, "bad.yaml: peft: unknown parameter(s) ['rank'] (did you mean lora.rank?)"),
    ("world", {"decoder": "nothere.bin"}, "nothere.bin: no such file"),
])
def test_training_stopped_by_bad_input_keeps_the_previous_outputs(world, section, change, message):
    outputs = [world / "checkpoints/lora/model.safetensors", world / "live/train/lora/metrics.json",
               world / "logs/train/lora.json"]
    if not all(p.exists() for p in outputs):
        if not (world / "features/train.h5").exists():
            stage(world, "stages.extract")
        stage(world, "stages.train", "--variant", "lora")
    before = [p.read_bytes() for p in outputs]
    params = yaml.safe_load((world / "params.yaml").read_text())
    params[section].update(change)
    (world / "bad.yaml").write_text(yaml.safe_dump(params))
    stderr = failed_stage(world, "bad.yaml", "stages.train", "--variant", "lora")
    assert message in stderr and "Traceback" not in stderr, stderr
    assert [p.read_bytes() for p in outputs] == before


def test_extraction_stopped_by_bad_input_keeps_the_previous_features(world):
    if not (world / "features/train.h5").exists():
        stage(world, "stages.extract")
    features = snapshot(world / "features", "*.h5")
    params = yaml.safe_load((world / "params.yaml").read_text())
    params["extract"]["encoder"]["name"] = "nothere.pt"
    (world / "bad.yaml").write_text(yaml.safe_dump(params))
    stderr = failed_stage(world, "bad.yaml", "stages.extract")
    assert "nothere.pt" in stderr and "Traceback" not in stderr, stderr
    assert_same_files(features, world / "features")


def test_decoding_stopped_by_unreadable_features_keeps_the_previous_predictions(world):
    if not (world / "checkpoints/lora/model.safetensors").exists():
        if not (world / "features/train.h5").exists():
            stage(world, "stages.extract")
        stage(world, "stages.train", "--variant", "lora")
    stage(world, "stages.decode", "--variant", "lora")
    predictions = snapshot(world / "predictions/lora")
    p3 = world / "features/p3.h5"
    intact = p3.read_bytes()
    try:
        p3.write_bytes(intact[: len(intact) // 2])
        stderr = failed_stage(world, "params.yaml", "stages.decode", "--variant", "lora")
        assert "features/p3.h5" in stderr and "Traceback" not in stderr, stderr
        assert_same_files(predictions, world / "predictions/lora")   # none removed, none rewritten
    finally:
        p3.write_bytes(intact)


def test_atomic_folder_gets_the_umask_permissions(tmp_path):
    """mkdtemp makes its folder 0700; renamed into place as is, release/ or report/ would be
    unreadable to anyone else (a grader, a web server)."""
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "release") as tmp:
            (tmp / "a.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "release").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "release/a.json").stat().st_mode & 0o777 == 0o644


def test_a_checkpoint_and_the_release_get_the_umask_permissions(tmp_path, monkeypatch, course_sd):
    """safetensors replaces the file it writes with a new 0600 one: the checkpoint, and the
    release made from it, must still be readable by another user (a TA's account)."""
    from captioning.checkpoint import save_trainable
    from stages import select
    model = build(course_sd, "gated_cross", "lora")
    old = os.umask(0o022)
    try:
        ckpt = tmp_path / "checkpoints" / "lora" / "model.safetensors"
        save_trainable(model, ckpt)
        assert ckpt.stat().st_mode & 0o777 == 0o644
        world = build_tiny_world(tmp_path / "w")
        (world / "metrics").mkdir()
        (world / "metrics" / "lora.json").write_text('{"cider": 0.1}')
        (world / "metrics" / "visual_prefix.json").write_text('{"cider": 0.0}')
        (world / "checkpoints" / "lora").mkdir(parents=True)
        shutil.copyfile(ckpt, world / "checkpoints" / "lora" / "model.safetensors")
        os.chmod(world / "hw3_data/p2_data/encoder.json", 0o600)   # a user's own file
        monkeypatch.chdir(world)
        select.main([])
    finally:
        os.umask(old)
    release = world / "release"
    assert sorted((p.name, p.stat().st_mode & 0o777) for p in release.iterdir()) == [
        ("captioner.safetensors", 0o644), ("encoder.json", 0o644), ("selected.json", 0o644),
        ("vocab.bpe", 0o644)]


def test_an_output_path_that_names_an_input_is_refused(tmp_path):
    image, elsewhere = tmp_path / "a.png", tmp_path / "b.json"
    image.write_bytes(b"png")
    os.link(image, tmp_path / "hard.png")
    (tmp_path / "link.png").symlink_to(image)
    (tmp_path / "sub").mkdir()
    inputs = [image, "ViT-B/32", tmp_path / "missing.bin"]
    for out in (image, tmp_path / "sub" / ".." / "a.png"):
        with pytest.raises(ValueError, match="is an input"):
            check_writable(out, inputs)
    with pytest.raises(ValueError, match="is an input"):   # an input given through a symlink
        check_writable(image, [tmp_path / "link.png"])
    check_writable(elsewhere, inputs)              # a new file
    # the write replaces the link itself, or this name of the file, and the image stays
    for out in (tmp_path / "link.png", tmp_path / "hard.png"):
        check_writable(out, inputs)
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"output")
        assert image.read_bytes() == b"png" and out.read_bytes() == b"output"


def test_a_stage_dies_with_the_dvc_that_started_it(tmp_path):
    """SIGKILL to `dvc` alone must not leave the stage's python running as an orphan that writes
    outputs later: run_stage asks the kernel to kill it with its parent."""
    pid_file = tmp_path / "child.pid"
    child = (f"import os, time; from common.errors import run_stage; "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             f"run_stage(lambda: time.sleep(60))")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time; subprocess.Popen([sys.executable, "
                               f"'-c', {child!r}]); time.sleep(60)"], cwd=Path(__file__).parents[1],
                              env=ENV)
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the stage outlived the process that started it")
