"""The pipeline run by DVC itself, as its users run it, in a copy of the repository with a tiny
params.yaml: `dvc repro`, `dvc metrics show/diff`, `dvc exp run -S`, the experiment queue with
two workers, and the seam with DVC (DVC deletes a stage's outputs before running it): a bad
value, a misspelt key and a corrupt feature file each stop the run with one line, and every
earlier output is still there or comes back with `make restore`."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not (BIN / "dvc").is_file() or not shutil.which("java"),
                                reason="needs dvc beside this Python and Java (the caption metrics)")

TINY = {
    "demo_data": {"image_size": 32, "n_train": 24, "n_val": 8, "n_classes": 4, "n_p1_per_class": 1},
    "demo_clip": {"input_resolution": 32, "n_single": 16, "batch_size": 16, "steps": 3,
                  "warmup_steps": 1, "eval_every": 0, "threads": 1},
    "demo_vocab": {"vocab_size": 300},
    "demo_gpt2": {"n_layer": 1, "n_embd": 32, "block_size": 128, "epochs": 1, "batch_size": 16,
                  "warmup_steps": 1, "log_every": 1},
    "train": {"epochs": 1, "batch_size": 16, "warmup_steps": 1, "val_images": 4,
              "val_batch_size": 4},
    "decode": {"beam_size": 2, "max_new_tokens": 6, "batch_size": 8},
    "score": {"metrics": ["cider", "clipscore"]},
    "zeroshot": {"batch_size": 8, "n_top5": 1},
    "extract": {"batch_size": 8},
    "variants": {"lora": {"bridge": "gated_cross", "peft": "lora"},
                 "adapter": {"bridge": "gated_cross", "peft": "adapter"}},
}


def run(repo, *args, ok=True):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True)
    assert (result.returncode == 0) == ok, (args, result.stdout[-3000:], result.stderr[-3000:])
    return result


def merge(params, tiny):
    for key, value in tiny.items():
        if isinstance(value, dict) and key != "variants" and isinstance(params.get(key), dict):
            merge(params[key], value)
        else:
            params[key] = value


def tiny_copy(repo):
    """Copy this repository's files (tracked, or untracked and not ignored) to `repo`, without the
    committed run's outputs and dvc.lock, with the TINY params."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        if (REPO / rel).is_file() and not rel.startswith(("live/", "metrics/", "plots/")):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    merge(params, TINY)
    params["world"]["decoder_heads"] = params["demo_gpt2"]["n_head"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.lock").unlink()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC copy of this repository's tracked files with tiny params, reproduced once."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    tiny_copy(repo)
    for args in (["git", "init", "-q"], ["git", "add", "-A"],
                 ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        run(repo, *args)
    run(repo, "dvc", "repro")
    for args in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t",
                                        "commit", "-qm", "reproduced"]):
        run(repo, *args)
    return repo


def test_a_fresh_clone_shows_the_committed_metrics(repo, tmp_path):
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    shown = json.loads(run(clone, "dvc", "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]   # the workspace's, keyed ""
    assert "cider" in metrics["metrics/lora.json"]["data"]
    assert "best_val_cider" in metrics["live/train/adapter/metrics.json"]["data"]


def test_an_experiment_retrains_only_the_variants_its_params_reach(repo):
    out = run(repo, "dvc", "exp", "run", "-n", "rank4", "-S", "peft.lora.rank=4").stdout
    assert "Running stage 'train@lora'" in out and "Running stage 'train@adapter'" not in out
    assert "Running stage 'extract'" not in out
    diff = json.loads(run(repo, "dvc", "metrics", "diff", "--json").stdout)
    assert "live/train/lora/metrics.json" in diff
    table = run(repo, "dvc", "exp", "show", "--csv").stdout
    assert "rank4" in table and table.count("\n") >= 3
    plots = json.loads(run(repo, "dvc", "plots", "diff", "HEAD", "rank4", "--json").stdout)
    assert not plots.get("errors") and plots
    run(repo, "dvc", "exp", "apply", "rank4")
    assert yaml.safe_load((repo / "params.yaml").read_text())["peft"]["lora"]["rank"] == 4
    assert "up to date" in run(repo, "dvc", "status").stdout
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")


@pytest.mark.parametrize("change, message", [
    ({"peft": {"lora": {"rank": 0}}}, "peft.lora.rank=0: must be at least 1"),
    ({"peft": {"lora": {"rnak": 4}}}, "unknown parameter(s) ['rnak']"),
    ({"decode": {"beam_size": 0}}, "decode.beam_size must be >= 1"),
    ({"train": {"lr": "fast"}}, "train.lr='fast': expected a number"),
])
def test_bad_params_stop_dvc_repro_before_any_output_is_deleted(repo, change, message):
    before = snapshot(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    merge(params, change)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run(repo, "dvc", "repro", ok=False)
        assert message in result.stderr + result.stdout
        assert "Running stage 'params'" in result.stdout and "train@" not in result.stdout
        assert snapshot(repo) == before
    finally:
        run(repo, "git", "checkout", "-q", "--", "params.yaml", ".params_checked")


def test_a_corrupt_feature_file_stops_training_and_make_restore_brings_back_its_outputs(repo):
    before = snapshot(repo)
    features = repo / "features" / "train.h5"
    data = features.read_bytes()
    features.write_bytes(data[: len(data) // 2])
    result = run(repo, "dvc", "repro", "-s", "train@lora", ok=False)
    assert "train.h5: not a readable HDF5 file" in result.stderr + result.stdout
    run(repo, "make", "restore", "-s")
    assert snapshot(repo) == before


def test_two_queued_experiments_run_with_two_workers(repo):
    for rank in (2, 6):
        run(repo, "dvc", "exp", "run", "--queue", "-n", f"q{rank}", "-S", f"peft.lora.rank={rank}")
    run(repo, "dvc", "queue", "start", "-j", "2")
    for _ in range(600):   # until both are done (`dvc queue status`: task, name, created, status)
        status = [line.split() for line in run(repo, "dvc", "queue", "status").stdout.splitlines()]
        states = {row[1]: row[-1] for row in status if len(row) >= 4 and row[1] in ("q2", "q6")}
        if states and not {"Queued", "Running"} & set(states.values()):
            break
        time.sleep(1)
    assert states == {"q2": "Success", "q6": "Success"}, states
    shown = json.loads(run(repo, "dvc", "exp", "show", "--json").stdout)
    names = {rev["name"]: rev["data"]["metrics"] for entry in shown
             for exp in entry.get("experiments") or [] for rev in exp["revs"]}
    assert {"q2", "q6"} <= names.keys()
    trained = {name: names[name]["live/train/lora/metrics.json"]["data"] for name in ("q2", "q6")}
    assert trained["q2"]["trainable_params"] < trained["q6"]["trainable_params"], trained
    assert all("cider" in names[name]["metrics/lora.json"]["data"] for name in ("q2", "q6"))


def snapshot(repo):
    """{path: bytes} of every pipeline output: what a failed run must leave as it was."""
    out = {}
    for folder in ("checkpoints", "live", "metrics", "predictions", "features", "release"):
        for p in sorted((repo / folder).rglob("*")):
            if p.is_file():
                out[p.relative_to(repo).as_posix()] = p.read_bytes()
    return out
