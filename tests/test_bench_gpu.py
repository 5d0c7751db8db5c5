"""bench/gpu.py, the one-call GPU decision script, at toy sizes on the CPU: every step runs
(hw3_2.sh as a subprocess against a tiny random-weight release included) and leaves its rows in
gpu_results.json. Nothing here needs a GPU; the GPU numbers come from the device run."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["checks", "build", "train", "hw3_2", "epoch", "compile"]


def test_gpu_script_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--small",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "gpu_results.json").read_text())
    assert list(results["steps"]) == STEPS
    assert all(s["status"] == "done" for s in results["steps"].values()), results["steps"]
    rows = results["rows"]
    for step in STEPS[1:]:
        assert any(r["step"] == step for r in rows), f"no row for {step}"
    train = [r for r in rows if r["step"] == "train"]
    # every variant, two batch sizes, random and by-image batches
    assert len(train) == 8 * 2 * 2
    assert {r["batches"] for r in train} == {"random", "by image"}
    assert all(r["captions_per_s"] > 0 and r["host_bound"] is None for r in train)  # CPU: no GPU
    hw3_2 = next(r for r in rows if r["step"] == "hw3_2")
    assert hw3_2["ok"] and hw3_2["captioned"] == hw3_2["images"]
    epoch = [r for r in rows if r["step"] == "epoch"]
    assert len(epoch) == 8 and all(r["epoch_s_random"] > r["eval_s"] > 0 for r in epoch)
    assert len([r for r in rows if r["step"] == "compile"]) == 3
    assert (out / "gpu_table.md").read_text().count("|") > 100
    assert (out / "hw3_2_log.txt").is_file()


def test_gpu_script_stops_with_a_clear_message_without_cuda(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cuda", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})   # no GPU, anywhere
    assert run.returncode == 2
    assert "STOP: --device cuda was asked" in run.stdout
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    assert "no CUDA" in results["meta"]["error"] and results["rows"] == []
