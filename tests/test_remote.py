"""A DVC remote that machines share (Makefile: `make remote`, `make push`, `make pull`): the
pipeline reproduced in one clone and pushed to a folder remote; a second clone pulls it and DVC
finds every stage up to date (nothing re-runs); a third, fresh, takes the hand-in's DVC route
(`make pull-release`: release/ from the remote, then the weights' prefetch). The pipeline is this
repository's, in a git copy with the tiny params of tests/test_dvc_runs.py."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from common.distributed import cpu_cores
from tests.test_dvc_runs import run, tiny_copy

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VENV = BIN.parent
pytestmark = pytest.mark.skipif(not (BIN / "dvc").is_file() or not shutil.which("java")
                                or not shutil.which("make"),
                                reason="needs dvc beside this Python, Java and make")


def make(repo, *args, ok=True):
    """`make ARGS` with this Python's environment as the repository's .venv (not rebuilt)."""
    installed = VENV / ".installed"
    return run(repo, "make", "-s", f"VENV={VENV}", "-o", str(installed), "-o",
               ".dvc/plots_offline.html", *args, ok=ok)


def commit(repo, message):
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def outputs(repo, *folders):
    """{path: bytes} of the files DVC caches under `folders`."""
    return {p.relative_to(repo).as_posix(): p.read_bytes() for f in folders
            for p in sorted((repo / f).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """(repository, remote folder): the tiny pipeline reproduced, the folder set up as the
    default remote by `make remote` (committed in .dvc/config), everything pushed."""
    root = tmp_path_factory.mktemp("remote")
    repo = root / "repo"
    tiny_copy(repo)
    run(repo, "git", "init", "-q")
    commit(repo, "tiny")
    run(repo, "dvc", "repro")
    commit(repo, "reproduced")
    storage = root / "storage"
    make(repo, "remote", f"REMOTE={storage}")
    commit(repo, "the shared remote")
    assert "files pushed" in make(repo, "push").stdout
    return repo, storage


def test_make_remote_names_the_storage_it_needs(pushed):
    repo, _ = pushed
    result = make(repo, "remote", ok=False)
    assert "make remote: name the storage, e.g. make remote REMOTE=" in result.stderr


def test_a_second_clone_pulls_every_output_and_nothing_reruns(pushed, tmp_path):
    repo, storage = pushed
    assert any(storage.rglob("*")), "nothing was pushed"
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert f"url = {storage}" in (clone / ".dvc/config").read_text()   # committed: every clone
    pulled = make(clone, "pull").stdout
    assert "Data and pipelines are up to date." in pulled   # make pull ends with dvc status
    folders = ("features", "checkpoints", "predictions", "release", "data")
    assert outputs(clone, *folders) == outputs(repo, *folders)
    repro = run(clone, "dvc", "repro").stdout
    assert "Running stage" not in repro and "Data and pipelines are up to date." in repro


def test_the_hand_in_dvc_route_takes_the_release_from_the_remote(pushed, tmp_path):
    """`make pull-release` (hw3_download.sh's route on our machines) in a fresh clone. In the demo
    world the released encoder and zero-shot CLIP are a local file that a stage makes
    (data/demo/clip_demo.pt), which the target pulls too; in the real world they are named models
    that the prefetch downloads."""
    repo, _ = pushed
    clone = tmp_path / "fresh"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    result = make(clone, "pull-release")
    assert "ready: hw3_2 image encoder" in result.stdout
    assert outputs(clone, "release") == outputs(repo, "release")
    assert not (clone / "checkpoints").exists()   # the release alone, not every output


@pytest.mark.skipif(cpu_cores() < 2, reason="needs 2 CPU cores")
def test_an_experiment_with_two_processes_per_stage_keeps_the_stage_commands(pushed, tmp_path):
    """`dvc exp run -S train.nproc_per_node=2 -S decode.nproc_per_node=2` in a pulled clone: the
    stages re-run themselves under torchrun; dvc.lock records the same commands; the metrics are
    those of one process (the same captions from nearly the same weights)."""
    repo, _ = pushed
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    make(clone, "pull")
    result = run(clone, "dvc", "exp", "run", "-n", "ddp", "-S", "train.nproc_per_node=2",
                 "-S", "decode.nproc_per_node=2")
    said = result.stdout + result.stderr
    assert "Running stage 'train@lora'" in said and "Running stage 'extract'" not in said
    assert "train.nproc_per_node: 2 processes: torchrun --standalone" in said
    assert "decode.nproc_per_node: 2 processes: torchrun --standalone" in said
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert lock["train@lora"]["cmd"] == "python -m stages.train --variant lora"
    assert lock["decode@lora"]["cmd"] == "python -m stages.decode --variant lora"
    assert json.loads((clone / "logs/train/lora.json").read_text())["processes"] == 2
    for variant in ("lora", "adapter"):
        one = json.loads((repo / f"live/train/{variant}/metrics.json").read_text())
        two = json.loads((clone / f"live/train/{variant}/metrics.json").read_text())
        assert two["val"]["loss"] == pytest.approx(one["val"]["loss"], abs=1e-3)
    table = run(clone, "dvc", "exp", "show", "--csv").stdout
    assert "ddp" in table and "nproc_per_node" in table
