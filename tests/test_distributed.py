"""The stages as several processes under torchrun (common/distributed.py), on the CPU with gloo,
in a tiny world: two processes give what one gives (training: the same trainable weights up to
the order of fp32 additions; extraction and decoding: the same bytes), the checkpoint is written
once, and a run that cannot go on (a rank killed or stalled, a rendezvous out of reach, more
processes than the machine has cores) stops with one line, in bounded time, writing nothing.

Faults are injected from outside the code under test: a sitecustomize module on PYTHONPATH wraps
training.loop's functions in the ranks torchrun starts (HW3_TEST_FAULT, HW3_TEST_SAVES)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from captioning.decoding import DecodeConfig
from common.distributed import Ranks, check_nproc, cpu_cores
from common.errors import ParamsError
from common.params import from_section
from stages.extract import ExtractConfig
from tests.tiny_world import build_tiny_world
from training.loop import TrainConfig, rank_share

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# Two processes need two cores (one each at most, common.distributed.check_nproc).
two_cores = pytest.mark.skipif(cpu_cores() < 2, reason="needs 2 CPU cores")
# fp32 reduction order: DDP sums the two shares' gradients where one process sums all the
# captions' at once; after the tiny world's 8 AdamW steps the weights differ by ~5e-6 at most.
WEIGHT_ATOL = 5e-5

SITECUSTOMIZE = '''
import os
if "RANK" in os.environ and (os.environ.get("HW3_TEST_FAULT") or os.environ.get("HW3_TEST_SAVES")):
    import training.loop as loop
    fault = os.environ.get("HW3_TEST_FAULT")   # "<rank>:<step>:kill" or "<rank>:<step>:stall"
    if fault and fault.split(":")[0] == os.environ["RANK"]:
        _, at, how = fault.split(":")
        calls, step = [0], loop.train_step
        def train_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(at):
                if how == "kill":
                    os.kill(os.getpid(), 9)
                import time
                time.sleep(600)
            return step(*args, **kwargs)
        loop.train_step = train_step
    record = os.environ.get("HW3_TEST_SAVES")
    if record:
        save = loop.save_trainable
        def save_trainable(*args, **kwargs):
            with open(record, "a") as f:
                f.write(os.environ["RANK"] + "\\n")
            return save(*args, **kwargs)
        loop.save_trainable = save_trainable
'''


def environment(tmp_path, **extra):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHONPATH=os.pathsep.join([str(hooks), str(REPO)]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", **extra)
    return env


def run(cwd, args, tmp_path, ok=True, timeout=300, **env):
    start = time.monotonic()
    result = subprocess.run(args, cwd=cwd, env=environment(tmp_path, **env), capture_output=True,
                            text=True, timeout=timeout)
    result.seconds = time.monotonic() - start
    assert (result.returncode == 0) == ok, (args, result.stdout[-3000:], result.stderr[-3000:])
    return result


def stage(name, *args):
    return [sys.executable, "-m", f"stages.{name}", *args]


def torchrun(nproc, name, *args):
    return [*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "-m", f"stages.{name}",
            *args]


def set_params(folder, **sections):
    params = yaml.safe_load((folder / "params.yaml").read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def copy(world, folder, *outputs):
    """A working copy of the tiny world: its params (the data paths in them are absolute) and
    the named output folders."""
    folder.mkdir()
    shutil.copy(world / "params.yaml", folder / "params.yaml")
    for name in outputs:
        shutil.copytree(world / name, folder / name)
    return folder


def files(folder):
    """{relative path: bytes} of every file under `folder` (temporary leftovers included)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world with features extracted by one process and a variant trained by one
    process: one epoch (the checkpoint is the last step's), batches of 17 of the 120 captions,
    so shares of 9 and 8 and a last batch of one caption (one rank's share empty)."""
    root = build_tiny_world(tmp_path_factory.mktemp("world"))
    set_params(root, train={"epochs": 1, "batch_size": 17})
    tmp = tmp_path_factory.mktemp("env")
    run(root, stage("extract"), tmp)
    run(root, stage("train", "--variant", "lora"), tmp)
    return root


# --- shares -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, world_size", [(17, 2), (1, 2), (10, 3), (64, 8), (5, 8)])
def test_the_shares_of_a_batch_are_its_contiguous_parts(n, world_size):
    items = list(range(n))
    shares = [Ranks(r, world_size, r, world_size, "cpu").share(items) for r in range(world_size)]
    assert [i for s in shares for i in s] == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("n, size, world_size", [(24, 8, 2), (25, 8, 2), (7, 8, 3), (100, 4, 3)])
def test_the_blocks_of_the_ranks_are_the_batches_of_one_process(n, size, world_size):
    blocks = [Ranks(r, world_size, r, world_size, "cpu").blocks(n, size) for r in range(world_size)]
    assert sorted(i for b in blocks for i in b) == list(range(n))
    one = [list(range(s, min(n, s + size))) for s in range(0, n, size)]
    for r, mine in enumerate(blocks):   # a rank's items, `size` at a time, are its blocks
        assert [mine[s:s + size] for s in range(0, len(mine), size)] == one[r::world_size]


def test_the_weighted_shares_give_the_mean_over_the_batch_tokens():
    batch = [(0, [1] * k) for k in (3, 9, 1, 4, 7)]   # captions of 3..9 tokens
    losses = {0: 2.0, 1: 5.0}   # a mean token loss per share
    weights, total = [], 0.0
    for r in range(2):
        share, weight, own, n = rank_share(batch, Ranks(r, 2, r, 2, "cpu"), 48)
        weights.append(weight)
        assert own == sum(len(t) + 1 for _, t in share) and n == 29
        total += losses[r] * weight
    assert sum(weights) == pytest.approx(1.0)
    assert total == pytest.approx((2.0 * (4 + 10 + 2) + 5.0 * (5 + 8)) / 29)
    share, weight, own, _ = rank_share(batch[:1], Ranks(1, 2, 1, 2, "cpu"), 48)
    assert share == batch[:1] and weight == 0.0 and own == 0   # an empty share: zero weight


def test_process_counts_that_do_not_fit_are_refused_by_name():
    with pytest.raises(ParamsError, match=r"train.nproc_per_node=0: must be .* at least 1"):
        check_nproc(0, "cpu", "train.nproc_per_node")
    with pytest.raises(ParamsError, match=r"extract.nproc_per_node=\d+: .* one process per core"):
        check_nproc(cpu_cores() + 1, "cpu", "extract.nproc_per_node")
    for section, cls in (("train", TrainConfig), ("extract", ExtractConfig),
                         ("decode", DecodeConfig)):   # the params stage stops `dvc repro` there
        with pytest.raises(ParamsError, match=rf"{section}.nproc_per_node.*0"):
            from_section(cls, {"nproc_per_node": 0}, section)


# --- the stages under torchrun --------------------------------------------------------------

@two_cores
def test_extraction_by_two_processes_writes_the_files_of_one(world, tmp_path):
    two = copy(world, tmp_path / "two")
    result = run(two, torchrun(2, "extract"), tmp_path)
    assert files(two / "features") == files(world / "features")   # the same bytes, no leftovers
    assert "2 processes" in result.stderr


@two_cores
@pytest.mark.parametrize("length_parts", [1, 2])
def test_training_by_two_processes_gives_the_weights_of_one(world, tmp_path, length_parts):
    """Through the stage's own relaunch (train.nproc_per_node: 2, as `dvc repro` runs it); with
    train.speed.length_parts 2, each rank's share as two sub-batches in one forward."""
    two = copy(world, tmp_path / "two", "features")
    set_params(two, train={"nproc_per_node": 2, "speed": {"length_parts": length_parts}})
    saves = tmp_path / "saves"
    result = run(two, stage("train", "--variant", "lora"), tmp_path, HW3_TEST_SAVES=str(saves))
    assert "train.nproc_per_node: 2 processes: torchrun --standalone" in result.stderr
    assert saves.read_text() == "0\n"   # rank 0 alone wrote the checkpoint, once
    assert sorted(files(two / "checkpoints")) == ["lora/model.safetensors"]
    one = load_file(world / "checkpoints/lora/model.safetensors")
    got = load_file(two / "checkpoints/lora/model.safetensors")
    assert got.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(got[name], one[name], atol=WEIGHT_ATOL, rtol=0, msg=name)
    timing = json.loads((two / "logs/train/lora.json").read_text())
    assert timing["processes"] == 2
    live_one = json.loads((world / "live/train/lora/metrics.json").read_text())
    live_two = json.loads((two / "live/train/lora/metrics.json").read_text())
    assert live_two["step"] == live_one["step"] == 8   # ceil(120 / 17) global batches
    assert live_two["val"]["loss"] == pytest.approx(live_one["val"]["loss"], abs=1e-4)


@pytest.fixture(scope="module")
def decodable(world, tmp_path_factory):
    """The world with its checkpoint's trainable tensors moved well off training's few steps, so
    that the images' captions differ (a mix-up of rows between ranks would show)."""
    from captioning.checkpoint import load_captioner, save_trainable
    root = copy(world, tmp_path_factory.mktemp("decode") / "w", "features", "checkpoints")
    params = yaml.safe_load((root / "params.yaml").read_text())
    path = root / "checkpoints/lora/model.safetensors"
    model, _ = load_captioner(path, params["world"]["decoder"], "cpu")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    save_trainable(model, path)
    return root


@two_cores
@pytest.mark.parametrize("decode", [{}, {"method": "sample", "top_k": 5}, {"batch_size": 3}],
                         ids=["beam", "sample", "batch3"])
def test_decoding_by_two_processes_gives_the_captions_of_one(decodable, tmp_path, decode):
    one = copy(decodable, tmp_path / "one", "features", "checkpoints")
    two = copy(decodable, tmp_path / "two", "features", "checkpoints")
    for folder in (one, two):
        set_params(folder, decode=decode)
    run(one, stage("decode", "--variant", "lora"), tmp_path)
    set_params(two, decode={"nproc_per_node": 2})
    run(two, stage("decode", "--variant", "lora"), tmp_path)
    assert files(two / "predictions") == files(one / "predictions")
    captions = json.loads((one / "predictions/lora/val.json").read_text())
    assert len(set(captions.values())) > 1


@two_cores
def test_two_machines_through_a_c10d_rendezvous(world, tmp_path):
    """The README's multi-node command, both `nodes` on this machine: two torchrun agents, one
    process each, meeting at HOST:PORT; the run is the two-process run of one machine."""
    node = copy(world, tmp_path / "node", "features")
    port = free_port()
    command = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "hw3-test", "-m",
               "stages.train", "--variant", "lora"]
    env = environment(tmp_path)
    agents = [subprocess.Popen(command, cwd=node, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [o[1][-2000:] for o in outs]
    one = load_file(world / "checkpoints/lora/model.safetensors")
    got = load_file(node / "checkpoints/lora/model.safetensors")
    for name in one:
        torch.testing.assert_close(got[name], one[name], atol=WEIGHT_ATOL, rtol=0, msg=name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- runs that cannot go on -------------------------------------------------------------------

@pytest.fixture
def trained(world, tmp_path):
    """A copy of the world holding a finished training's outputs: a failed run must leave them
    (stopped before deleting) or delete them (stopped after), never half-write new ones."""
    return copy(world, tmp_path / "w", "features", "checkpoints", "live", "logs")


def no_leftovers(folder):
    return not [p for p in Path(folder).rglob(".tmp-*")]


@two_cores
@pytest.mark.parametrize("how", ["kill", "stall"])
def test_a_rank_that_dies_or_stalls_stops_the_run_with_one_line(trained, tmp_path, how):
    set_params(trained, train={"nproc_per_node": 2})
    timeout = {"HW3_DIST_TIMEOUT": "8"} if how == "stall" else {}
    result = run(trained, stage("train", "--variant", "lora"), tmp_path, ok=False,
                 HW3_TEST_FAULT=f"1:3:{how}", **timeout)
    last = result.stderr.strip().splitlines()[-1]
    if how == "kill":
        assert last == ("error: params.yaml: train.nproc_per_node: process 1 of 2 was killed by "
                        "signal 9 (SIGKILL) (its error, if any, is above); torchrun stopped the "
                        "others"), last
    else:   # rank 0 waited 8 s for rank 1's gradients, then stopped; torchrun stopped rank 1
        assert "error: train lora: rank 0 of 2: stopped: another process of the run failed, or " \
               "could not be reached within HW3_DIST_TIMEOUT=8 s" in result.stderr
        assert last.startswith("error: params.yaml: train.nproc_per_node: process 0 of 2 lost "
                               "contact with the others"), last
    assert result.seconds < 120
    assert not (trained / "checkpoints/lora/model.safetensors").exists()   # deleted, none new
    assert not (trained / "logs/train/lora.json").exists() and no_leftovers(trained)


def test_a_rendezvous_out_of_reach_stops_torchrun_before_any_stage_runs(trained, tmp_path):
    before = files(trained)
    command = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "nobody",
               "--rdzv-conf", "is_host=false,read_timeout=3", "-m", "stages.train",
               "--variant", "lora"]
    result = run(trained, command, tmp_path, ok=False, timeout=120)
    assert "RendezvousConnectionError" in result.stderr
    assert result.seconds < 60
    assert files(trained) == before


@pytest.mark.parametrize("via", ["params", "torchrun"])
def test_more_processes_than_cores_are_refused_before_anything_is_deleted(trained, tmp_path, via):
    before = files(trained)
    n = cpu_cores() + 1
    if via == "params":
        set_params(trained, train={"nproc_per_node": n})
        before = files(trained)
        result = run(trained, stage("train", "--variant", "lora"), tmp_path, ok=False)
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: params.yaml: train.nproc_per_node={n}: this machine gives this process "
            f"{cpu_cores()} CPU core(s): one process per core at most")
    else:
        result = run(trained, torchrun(n, "train", "--variant", "lora"), tmp_path, ok=False)
        assert (f"error: torchrun --nproc-per-node={n}: this machine gives this process "
                f"{cpu_cores()} CPU core(s): one process per core at most") in result.stderr
    assert files(trained) == before
