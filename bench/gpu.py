"""One GPU run that decides (issue 25): one process, the real-size models built once (random
weights: GPT-2 small 12 x 768 and ViT-L/14-sized image tokens 257 x 1024), the measurements most
decisive first, each step under its own time cap and all within --budget. After every
measurement a line is printed and $OUT/gpu_results.json is written anew, so a timeout loses
nothing; a markdown table of everything closes the run (also $OUT/gpu_table.md).

    bash bench/device_checks.sh --prepare     # here, first: gpucarry/ (loralib, clip, ...)
    bash bench/device_checks.sh               # on the GPU machine: this script, ~5-6 minutes
    python -m bench.gpu --device cpu --small --out /tmp/gpu_smoke   # every step at toy sizes

Steps, in this order:
  checks   imports (the packages hw3_2.sh needs too) and CUDA, within 15 s: versions, the GPU;
           stops at once, saying why, if --device cuda has no CUDA or a package every step needs
           is missing (one that only some steps need: a warning naming them).
  build    the frozen decoder, a table of random image tokens on the device, the tokenizer.
  train    the eager training step of every variant at batch 64 and 256, captions in random
           order and by image (train.group_by_image), as train() takes it (bench.common.
           training_steps: train.speed as the pipeline sets it, fused AdamW, bf16 autocast, no
           host sync per step): the step time from CUDA events, captions/s, MFU, and the
           host-bound share (method printed below).
  hw3_2    `bash hw3_2.sh IMG_DIR OUT_JSON DECODER_BIN --release RELEASE_DIR` as a subprocess on
           1789 JPEGs (640 x 480) against a release of random weights (gated_cross:lora, the
           course-format GPT-2, worlds/real.yaml's timm encoder with a local weights file, a
           synthetic GPT-2-sized vocabulary, beam 5 batch 64), timed end to end from the
           subprocess' start (Python start-up included).
  epoch    a whole epoch per variant at batch 64: 53,020 captions at the train step's rate plus
           the per-epoch evaluation as train() runs it (training.loop.evaluate: val loss on 200
           images x 5 captions, greedy decoding of 200 images), measured.
  compile  train.speed.compile = reduce-overhead (CUDA graphs) for gated_cross:lora,
           gated_cross:adapter, visual_prefix:lora at batch 64: the first pass (compilation and
           graph recording) and the steady step time, against eager on the same batches.
"""
import argparse
import contextlib
import copy
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

START = time.monotonic()   # the standard library only so far: torch is imported by the checks

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["gated_cross:lora", "gated_cross:adapter", "gated_cross:prefix_tuning",
            "gated_cross:prompt_tuning", "gated_cross:adaption_prompt", "cross:lora",
            "gated_cross:none", "visual_prefix:lora"]
COMPILE_VARIANTS = ["gated_cross:lora", "gated_cross:adapter", "visual_prefix:lora"]
TRAIN_CAPTIONS = 10604 * 5       # an epoch of the course's train split
HW3_IMAGES = 1789                # the course's val split
# seconds per step; the last steps get less when the budget (--budget) runs short
CAPS = {"checks": 15, "build": 60, "train": 120, "hw3_2": 240, "epoch": 45, "compile": 150}
# The third-party packages this script imports, and those of hw3_2.sh's path: without one of the
# first, nothing runs; without one of the others, the steps named fail (and the rest still run).
ESSENTIAL = ["numpy", "torch", "tokenizers", "safetensors", "tqdm", "loralib"]
NEEDED_BY = {"timm": "hw3_2", "torchvision": "hw3_2", "PIL": "hw3_2", "yaml": "hw3_2",
             "clip": "hw3_2, epoch", "ftfy": "hw3_2, epoch", "regex": "hw3_2, epoch"}
PROJECT = ["bench.common", "bench.flops", "captioning.decoding", "training.loop",
           "inference.release", "inference.caption_folder", "stages.hw3_2"]
HOST_BOUND_METHOD = (
    "step time = CUDA events around the timed steps (no host sync between steps, as in "
    "train()) / steps; GPU busy = the union of the GPU's kernel and copy intervals per step in a "
    "torch.profiler window of the next steps (kineto); host-bound share = 1 - busy / step time: "
    "the part of a step the GPU waits for the host (Python, operator dispatch, launches)")


class StepTimeout(BaseException):
    """A step ran past its cap (BaseException: no `except Exception` on the way swallows it)."""


class Results:
    """gpu_results.json under `out`: meta, each step's status, the measured rows; written whole
    (a temp file renamed) after every change."""

    def __init__(self, out):
        self.out = Path(out) if out else None
        self.data = {"meta": {}, "steps": {}, "rows": []}
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)

    def meta(self, **fields):
        self.data["meta"].update(fields)
        self.save()

    def step(self, name, **fields):
        self.data["steps"].setdefault(name, {}).update(fields)
        self.save()

    def row(self, step, line, **fields):
        self.data["rows"].append({"step": step, **fields})
        print(line, flush=True)
        self.save()

    def rows(self, step, failed=False):
        """The step's measured rows (failed: those that failed or were skipped instead)."""
        return [r for r in self.data["rows"] if r["step"] == step
                and ("error" in r or "skipped" in r) == failed]

    def skip(self, step, label, **ids):
        self.row(step, f"{step} {label}: skipped, the step's cap is near",
                 skipped="the step's cap was near", **ids)

    def save(self):
        if self.out:
            tmp = self.out / ".gpu_results.json.part"
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            os.replace(tmp, self.out / "gpu_results.json")


class Deadline:
    def __init__(self, end):
        self.end = end

    def left(self):
        return self.end - time.monotonic()


@contextlib.contextmanager
def alarm(seconds):
    """StepTimeout raised in the main thread after `seconds`."""
    def ring(signum, frame):
        raise StepTimeout()
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_step(name, results, budget, fn, *args):
    """fn(Deadline, *args) under min(its cap, what is left of the budget); its status saved."""
    cap = min(CAPS[name], budget.left())
    if cap < 3:
        results.step(name, status="skipped: the budget is spent", cap_s=0)
        print(f"\n== {name}: skipped, the budget is spent", flush=True)
        return None
    results.step(name, status="running", cap_s=round(cap))
    print(f"\n== {name} (at most {cap:.0f} s)", flush=True)
    start, value = time.monotonic(), None
    try:
        with alarm(cap):
            value = fn(Deadline(start + cap), *args)
        status = "done"
    except StepTimeout:
        status = f"cut at its cap of {cap:.0f} s"
    except Exception as e:   # the next steps still run
        traceback.print_exc()
        status = f"failed: {type(e).__name__}: {e}"
    used = time.monotonic() - start
    missed = len(results.rows(name, failed=True))
    if missed and status == "done":
        status = f"done; {missed} measurement(s) failed or skipped"
    results.step(name, status=status, seconds=round(used, 1))
    print(f"== {name}: {status} ({used:.0f} s)", flush=True)
    return value


# --- checks -------------------------------------------------------------------------------------

def checks(args, results):
    """Import everything, then CUDA; False when the run cannot go on."""
    versions, missing, warnings = {}, [], []
    for name in ESSENTIAL + list(NEEDED_BY) + PROJECT:
        try:
            module = importlib.import_module(name)
            if name not in PROJECT:
                versions[name] = str(getattr(module, "__version__", "?"))
        except Exception as e:
            problem = f"{name} ({type(e).__name__}: {e})"
            if name in NEEDED_BY:
                warnings.append(f"{problem}: the {NEEDED_BY[name]} step(s) will fail")
            else:
                missing.append(problem)
    carry = ("loralib, clip, ftfy and wcwidth come from gpucarry/ on the GPU machine: run `bash "
             "bench/device_checks.sh --prepare` here before the device call")
    if missing:
        results.meta(python=sys.version.split()[0], error="missing: " + "; ".join(missing))
        print(f"STOP: cannot import {'; '.join(missing)}. ({carry}.)", flush=True)
        return False
    for w in warnings:
        print(f"WARNING: cannot import {w} ({carry})", flush=True)
    import torch
    info = dict(python=sys.version.split()[0], torch=torch.__version__,
                cuda_build=torch.version.cuda, packages=versions, import_warnings=warnings,
                cpu_cores=os.cpu_count(),
                started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            results.meta(**info, error="--device cuda, but torch sees no CUDA device")
            print(f"STOP: --device {args.device} was asked, but torch {torch.__version__} (CUDA "
                  f"build {torch.version.cuda}) sees no CUDA device "
                  f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}).", flush=True)
            return False
        x = torch.ones(256, 256, device=device)
        (x @ x).sum().item()   # the context and cuBLAS up
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    else:
        info.update(gpu=None)
    info["checks_s"] = round(time.monotonic() - START, 1)
    results.meta(**info)
    print(f"python {info['python']}, torch {info['torch']} (CUDA {info['cuda_build']}, cuDNN "
          f"{info.get('cudnn')}), GPU {info.get('gpu')} ({info.get('gpu_memory_gib')} GiB), "
          f"{info['cpu_cores']} CPU cores; " + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; checks done {info['checks_s']} s after start", flush=True)
    return True


# --- build --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    args: object
    device: object
    decoder: object         # the frozen GPT2, on the device
    tokenizer: object       # synthetic GPT-2-format vocabulary of the decoder's size
    table: object           # [images, V, D] fp16 random image tokens, on the device
    val: object             # training.loop.CaptionPairs: val images (CPU, as train() has them)
    visual_tokens: int
    visual_width: int
    peak: float             # FLOP/s the MFU is against (None on the CPU)
    peak_label: str
    rates: dict = dataclasses.field(default_factory=dict)   # (variant, batch, kind) -> captions/s


SMALL = dict(gpt2=dict(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64),
             visual=(17, 32), table=48, val_images=8, batches=(8, 16), hw3_images=12,
             encoder=dict(kind="timm", name="vit_base_patch16_clip_quickgelu_224", image_size=32,
                          model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2),
                          precision="fp32"))
REAL = dict(gpt2={}, visual=(257, 1024), table=1024, val_images=200, batches=(64, 256),
            hw3_images=HW3_IMAGES, encoder=None)   # encoder: worlds/real.yaml's


def build(deadline, args, results):
    import torch
    from bench import flops
    from bench.common import random_captions, synthetic_tokenizer
    from captioning.gpt2 import GPT2, GPT2Config
    from training.loop import CaptionPairs, TrainConfig
    size = SMALL if args.small else REAL
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        decoder = GPT2(GPT2Config(**size["gpt2"]))
    tokenizer = synthetic_tokenizer(decoder.config.vocab_size)
    V, D = size["visual"]
    g = torch.Generator(device=device).manual_seed(0)
    table = torch.randn(size["table"], V, D, generator=g, device=device, dtype=torch.float16)
    # the val split as train() holds it: features on the CPU, 5 captions per image
    n_val = size["val_images"] or TrainConfig().val_images
    names = [f"val_{i:05d}" for i in range(n_val)]
    captions = random_captions(5 * n_val, decoder.config.vocab_size, seed=7)
    refs = {n: [tokenizer.decode(c) for c in captions[5 * i:5 * i + 5]]
            for i, n in enumerate(names)}
    val_tokens = torch.randn(n_val, V, D, generator=torch.Generator().manual_seed(1)).half()
    val = CaptionPairs((names, val_tokens), refs, tokenizer)
    if device.type == "cuda":
        peak, label = flops.gpu_peak(torch.cuda.get_device_name(device))
        torch.cuda.synchronize()
    else:
        peak, label = None, "none (CPU: no MFU)"
    about = (f"GPT-2 {decoder.config.n_layer} x {decoder.config.n_embd}, vocab "
             f"{decoder.config.vocab_size} (random); image tokens {V} x {D}; a table of "
             f"{len(table)} random images on {device}; val {n_val} images x 5 captions")
    results.meta(models=about, peak=label)
    results.row("build", f"built: {about}; MFU against: {label}", what=about, peak=label)
    return Context(args, device, decoder, tokenizer, table, val, V, D, peak, label)


# --- timing -------------------------------------------------------------------------------------

class StepTimer:
    """Seconds from start() to stop(): CUDA events on a GPU (the GPU's timeline, the host free
    to run ahead), host wall time with the device synchronised at both ends too."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.events = [self.torch.cuda.Event(enable_timing=True) for _ in range(2)]
            self.events[0].record()
        self.wall = time.perf_counter()

    def stop(self):
        """(event seconds, wall seconds); on the CPU both are wall seconds."""
        if self.cuda:
            self.events[1].record()
            self.torch.cuda.synchronize()
        wall = time.perf_counter() - self.wall
        if self.cuda:
            return self.events[0].elapsed_time(self.events[1]) / 1000, wall
        return wall, wall


def busy_per_step(step, batches, lr, device):
    """Seconds per step the device computes: the union of its activity intervals in a
    torch.profiler window over `batches` (on a GPU: kernels, copies, memsets; on the CPU, only
    to exercise this code: operator calls)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    # the GPU's activity only (no host operator records: a smaller trace, parsed faster)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for b in batches:
            step(b, lr)
        if cuda:
            torch.cuda.synchronize()
    want = {"kernel", "gpu_memcpy", "gpu_memset"} if cuda else {"cpu_op"}

    def wanted(e):   # torch < 2.12's kineto events have no activity_type(): their device type
        if hasattr(e, "activity_type"):
            return e.activity_type() in want
        return (e.device_type() == torch.autograd.DeviceType.CUDA) == cuda
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns())
                   for e in prof.profiler.kineto_results.events()
                   if wanted(e) and e.duration_ns() > 0)
    if cuda and not spans:
        raise RuntimeError("the profiler saw no GPU kernels (CUPTI unavailable?)")
    busy, end = 0, None
    for a, b in spans:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy / 1e9 / len(batches)


def build_variant_on(ctx, variant, perturb=False):
    """A Captioner of `variant` around a copy of the frozen decoder, made on the device."""
    import torch
    from bench.common import build_variant
    with torch.device(ctx.device):
        return build_variant(ctx.decoder, variant, ctx.visual_width, ctx.visual_tokens,
                             perturb=perturb)


def compile_backend(device):
    """On the CPU torch.compile runs dynamo with the eager backend: inductor's C++ compilation
    takes minutes on a small CPU, and CPU numbers decide nothing here."""
    import torch
    if device.type == "cuda":
        return contextlib.nullcontext()
    from unittest import mock
    real = torch.compile
    return mock.patch.object(torch, "compile",
                             lambda fn, mode=None, **kw: real(fn, backend="eager"))


# --- train --------------------------------------------------------------------------------------

def guarded(results, step, label, fn, **ids):
    """fn(), or, if it raises, a row saying so (the step goes on with its next measurement)."""
    try:
        return fn()
    except Exception as e:
        traceback.print_exc()
        results.row(step, f"{step} {label}: FAILED: {type(e).__name__}: {e}",
                    error=f"{type(e).__name__}: {e}", **ids)
        return None


def measure_train(ctx, model, batch, kind, warmup, steps, profiled):
    """The eager training step of `model` on `batch` captions composed as `kind` says."""
    import math
    from bench import flops
    from bench.common import (IdTokenizer, caption_batches, captions_per_image, mean_text_len,
                              peak_gib, peak_reset, training_steps)
    from training.loop import TrainConfig
    cuda = ctx.device.type == "cuda"
    vocab = ctx.decoder.config.vocab_size
    batches = caption_batches(len(ctx.table), warmup + steps + profiled, batch, vocab,
                              by_image=kind == "by image", seed=batch)
    timed = batches[warmup:warmup + steps]
    per_caption = flops.CaptionerShape.of(model).train_per_caption(
        round(mean_text_len(timed)), captions_per_image(timed))
    config = TrainConfig(batch_size=batch, group_by_image=kind == "by image")
    peak_reset(ctx.device)
    timer = StepTimer(ctx.device)
    with training_steps(model, ctx.table, IdTokenizer(vocab - 1), config, ctx.device) as step:
        for b in batches[:warmup]:
            step(b, config.lr)
        timer.start()
        for b in timed:
            loss = step(b, config.lr)
        event_s, wall_s = timer.stop()
        loss = loss.item()
        try:
            busy = busy_per_step(step, batches[warmup + steps:], config.lr, ctx.device)
        except Exception as e:   # the step time still counts
            print(f"GPU busy time not measured: {type(e).__name__}: {e}", flush=True)
            busy = None
    if not math.isfinite(loss):
        raise RuntimeError(f"loss {loss}")
    step_s = event_s / steps
    rate = batch / step_s
    return dict(captions_per_s=rate, step_ms=1000 * step_s, wall_ms=1000 * wall_s / steps,
                busy_ms=None if busy is None else 1000 * busy,
                host_bound=max(0.0, 1 - busy / step_s) if cuda and busy else None,
                tflops=rate * per_caption / 1e12,
                mfu=rate * per_caption / ctx.peak if cuda else None,
                peak_gib=peak_gib(ctx.device) if cuda else None, loss=loss,
                text_len=round(mean_text_len(timed), 1),
                captions_per_image=round(captions_per_image(timed), 2),
                epoch_train_s=TRAIN_CAPTIONS / rate)


def step_train(deadline, ctx, results):
    import torch
    print("host-bound share: " + HOST_BOUND_METHOD, flush=True)
    small, large = (SMALL if ctx.args.small else REAL)["batches"]
    # warm-up, timed and profiled steps per measurement
    plan = {small: (1, 2, 1), large: (1, 2, 1)} if ctx.args.small else \
        {small: (3, 10, 2), large: (2, 5, 2)}
    took = {}   # batch -> seconds of its last measurement: is there time for one more?
    for batch in (small, large):   # batch 64 of every variant first: the epoch targets
        for variant in ctx.args.variants:
            model = guarded(results, "train", f"{variant}: building it",
                            lambda: build_variant_on(ctx, variant), variant=variant, batch=batch)
            if model is None:
                continue
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            for kind in ("random", "by image"):
                expected = took.get(batch, 4 * took.get(small, 0))
                if deadline.left() < 1.5 * expected:
                    results.skip("train", f"{variant} batch {batch} {kind}", variant=variant,
                                 batch=batch, batches=kind)
                    continue
                start = time.monotonic()
                ids = dict(variant=variant, batch=batch, batches=kind)
                m = guarded(results, "train", f"{variant} batch {batch} {kind}",
                            lambda: measure_train(ctx, model, batch, kind, *plan[batch]), **ids)
                took[batch] = time.monotonic() - start
                if m is None:
                    continue
                ctx.rates[variant, batch, kind] = m["captions_per_s"]
                results.row("train", f"train {variant:<27} batch {batch:>3} {kind:<8}: "
                            f"{m['captions_per_s']:>8,.0f} captions/s, {m['step_ms']:.1f} ms/step "
                            f"(wall {m['wall_ms']:.1f}), device busy "
                            f"{fmt(m['busy_ms'], '.1f')} ms, "
                            f"host-bound {fmt(m['host_bound'], '.0%')}, {m['tflops']:.1f} TFLOP/s, "
                            f"MFU {fmt(m['mfu'], '.1%')}, peak {fmt(m['peak_gib'], '.1f')} GiB; "
                            f"epoch of {TRAIN_CAPTIONS} captions {m['epoch_train_s']:.0f} s",
                            trainable_m=round(trainable / 1e6, 2), **ids, **m)
            model = None   # its memory back before the next variant's
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()


# --- epoch --------------------------------------------------------------------------------------

def measure_evaluation(ctx, variant, config, subset):
    """(seconds of training.loop.evaluate as train() calls it, of which greedy decoding)."""
    from unittest import mock
    import training.loop as loop
    from bench.common import IdTokenizer, caption_batches, sync, training_steps
    from training.loop import evaluate
    model = build_variant_on(ctx, variant)
    decode_s = []
    real_caption_features = loop.caption_features

    def timed_decode(*a, **kw):
        t = time.perf_counter()
        out = real_caption_features(*a, **kw)
        sync(ctx.device)
        decode_s.append(time.perf_counter() - t)
        return out
    warm = caption_batches(len(ctx.table), 1, config.batch_size, ctx.decoder.config.vocab_size)
    with training_steps(model, ctx.table, IdTokenizer(ctx.tokenizer.eot_id), config,
                        ctx.device) as step, \
            mock.patch.object(loop, "caption_features", timed_decode), \
            mock.patch.object(loop, "tokenize_pair", lambda *a: (None, None)), \
            mock.patch.object(loop, "cider", lambda *a: (0.0, None)):
        step(warm[0], config.lr).item()   # as after an epoch's training: warm
        t = time.perf_counter()
        _, _, predictions = evaluate(model, ctx.val, ctx.tokenizer, config, ctx.device, subset)
        sync(ctx.device)
        eval_s = time.perf_counter() - t
    assert len(predictions) == len(subset)
    return eval_s, sum(decode_s)


def step_epoch(deadline, ctx, results):
    import torch
    from captioning.decoding import DecodeConfig
    from training.loop import TrainConfig
    batch = (SMALL if ctx.args.small else REAL)["batches"][0]
    config = TrainConfig(batch_size=batch)
    subset = sorted(ctx.val.references)[:config.val_images or None]
    print(f"epoch = {TRAIN_CAPTIONS} captions at the train step's rate (batch {batch}) + "
          f"training.loop.evaluate as train() calls it every epoch, inside the run's speed-ups: "
          f"val loss on {len(subset)} images x 5 captions, greedy decoding of {len(subset)} "
          f"images (batch {config.val_batch_size}). Random weights never emit the end token, so "
          f"every greedy caption runs the full {DecodeConfig().max_new_tokens} new tokens "
          "(trained ones end after ~12-15): an upper bound. The val CIDEr itself (Java "
          "PTBTokenizer + pycocoevalcap, not on the GPU machine) is left out.", flush=True)
    took = 0.0
    for variant in ctx.args.variants:
        if deadline.left() < 1.5 * took:
            results.skip("epoch", variant, variant=variant, batch=batch)
            continue
        start = time.monotonic()
        measured = guarded(results, "epoch", variant,
                           lambda: measure_evaluation(ctx, variant, config, subset),
                           variant=variant, batch=batch)
        took = time.monotonic() - start
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        if measured is None:
            continue
        eval_s, greedy_s = measured
        row = dict(variant=variant, batch=batch, eval_s=eval_s, greedy_s=greedy_s,
                   val_loss_s=eval_s - greedy_s)
        parts = []
        for kind, key in (("random", "random"), ("by image", "by_image")):
            rate = ctx.rates.get((variant, batch, kind))
            row[f"train_s_{key}"] = TRAIN_CAPTIONS / rate if rate else None
            row[f"epoch_s_{key}"] = TRAIN_CAPTIONS / rate + eval_s if rate else None
            parts.append(f"{kind} batches {row[f'epoch_s_{key}']:.1f} s" if rate else
                         f"{kind} batches: no train rate (not measured)")
        results.row("epoch", f"epoch {variant:<27}: evaluation {eval_s:.1f} s (val loss "
                    f"{row['val_loss_s']:.1f} s, greedy {greedy_s:.1f} s); whole epoch: "
                    + ", ".join(parts), **row)


# --- hw3_2 --------------------------------------------------------------------------------------

def release_settings(args):
    """(EncoderConfig without weights, DecodeConfig) of the release: worlds/real.yaml's encoder
    (params.yaml's decode with real.yaml's overrides), beam 5, batch 64."""
    import yaml
    from captioning.decoding import DecodeConfig
    from common.params import from_section
    from evaluation.encoders import EncoderConfig
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    real = yaml.safe_load((ROOT / "worlds/real.yaml").read_text())
    decode = {**params.get("decode", {}), **real.get("decode", {}), "method": "beam",
              "beam_size": 5, "batch_size": 64}
    encoder = SMALL["encoder"] if args.small else real["extract"]["encoder"]
    return (from_section(EncoderConfig, encoder, "encoder"),
            from_section(DecodeConfig, decode, "params.yaml + worlds/real.yaml: decode"))


def write_release(ctx, folder, encoder_cfg, decode_cfg):
    """release/ as stages/select.py writes it, of random weights; returns the decoder_model.bin."""
    import timm
    import torch
    from safetensors.torch import save_file
    from bench.common import build_variant, write_vocab
    from captioning.checkpoint import save_trainable
    from captioning.gpt2 import course_state_dict, weights_id
    from captioning.tokenizer import Tokenizer
    from evaluation.encoders import encoder_id
    release = folder / "release"
    release.mkdir(parents=True)
    # the image encoder: random weights in timm's format, fp16 (half the bytes to write and hash)
    kwargs = dict(encoder_cfg.model_kwargs)
    if encoder_cfg.image_size:
        kwargs["img_size"] = encoder_cfg.image_size
    with torch.device(ctx.device):
        model = timm.create_model(encoder_cfg.name, pretrained=False, num_classes=0, **kwargs)
    weights = folder / "encoder_random.safetensors"
    save_file({k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items()},
              str(weights))
    tokens, width = model.patch_embed.num_patches + model.num_prefix_tokens, model.num_features
    del model
    encoder_cfg = dataclasses.replace(encoder_cfg, weights=str(weights))
    decoder_bin = folder / "decoder_model.bin"
    decoder = copy.deepcopy(ctx.decoder).cpu()
    torch.save({k: v.cpu() for k, v in course_state_dict(decoder).items()}, decoder_bin)
    encoder_json, vocab_bpe = write_vocab(ctx.tokenizer, release)
    captioner = build_variant(decoder, "gated_cross:lora", width, tokens, perturb=True)
    captioner.config = dataclasses.replace(
        captioner.config, encoder_id=encoder_id(encoder_cfg),
        tokenizer_id=Tokenizer.from_files(encoder_json, vocab_bpe).identity,
        decoder_id=weights_id(decoder))
    save_trainable(captioner, release / "captioner.safetensors")
    (release / "selected.json").write_text(json.dumps({
        "variant": "gated_cross:lora", "scores": {"cider": 0.0},
        "encoder": dataclasses.asdict(encoder_cfg), "decode": dataclasses.asdict(decode_cfg),
        "decoder_heads": decoder.config.n_head}, indent=1))
    return release, decoder_bin


def hw3_python():
    """The interpreter scripts/run_module.sh picks."""
    if os.environ.get("HW3_PYTHON"):
        return os.environ["HW3_PYTHON"]
    venv = ROOT / ".venv/bin/python"
    return str(venv) if os.access(venv, os.X_OK) else "python3"


def step_hw3_2(deadline, ctx, results):
    from bench.common import write_jpegs
    n = (SMALL if ctx.args.small else REAL)["hw3_images"]
    encoder_cfg, decode_cfg = release_settings(ctx.args)
    with tempfile.TemporaryDirectory(prefix="bench_hw3_2_") as tmp:
        tmp = Path(tmp)
        t = time.monotonic()
        images = write_jpegs(tmp / "images", n)[0].parent
        release, decoder_bin = write_release(ctx, tmp, encoder_cfg, decode_cfg)
        prep_s = time.monotonic() - t
        out_json = tmp / "captions" / "val.json"
        cmd = ["bash", str(ROOT / "hw3_2.sh"), str(images), str(out_json), str(decoder_bin),
               "--release", str(release)]
        path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        carry = str(ROOT / "gpucarry")   # loralib, clip, ... on the GPU machine
        env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
                   PYTHONPATH=os.pathsep.join(path if carry in path else [carry] + path))
        log = (Path(ctx.args.out) if ctx.args.out else tmp) / "hw3_2_log.txt"
        print(f"release written in {prep_s:.0f} s ({n} JPEGs 640x480, encoder "
              f"{encoder_cfg.name} {encoder_cfg.precision}, decode {decode_cfg.method} "
              f"{decode_cfg.beam_size} max_new_tokens {decode_cfg.max_new_tokens}); running, "
              f"from {tmp}, with PYTHONPATH={env['PYTHONPATH']} (python: {hw3_python()}):\n  "
              f"{' '.join(cmd)} [--batch-size B]", flush=True)
        for batch in ctx.args.hw3_batches:
            if deadline.left() < 5:
                results.skip("hw3_2", f"batch {batch}", batch=batch)
                continue
            run_hw3_2(ctx, results, deadline, cmd + ["--batch-size", str(batch)], env, log, n,
                      out_json, encoder_cfg, dataclasses.replace(decode_cfg, batch_size=batch))
        if ctx.args.extract_images:
            step_extract(ctx, results, images, encoder_cfg)


def step_extract(ctx, results, images, encoder_cfg):
    """The extract stage's writing of features (write_features: JPEG decoding in DataLoader
    workers, the encoder under autocast, HDF5 rows) for the hw3_2 step's JPEGs and its random
    encoder, at each batch size of --extract-batches."""
    from common.imageio import list_images
    from evaluation.encoders import build_encoder, encoder_id
    from evaluation.features import write_features
    import torch
    paths = list_images(images)[:ctx.args.extract_images]
    release_cfg = json.loads((images.parent / "release" / "selected.json").read_text())["encoder"]
    cfg = dataclasses.replace(encoder_cfg, weights=release_cfg["weights"])
    encoder = build_encoder(cfg, device=ctx.device)
    workers = min(8, os.cpu_count() or 1)
    for batch in ctx.args.extract_batches:
        out = images.parent / f"features_{batch}.h5"
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        write_features(out, encoder, paths, encoder_id(cfg), batch_size=batch, num_workers=workers,
                       device=ctx.device, desc="extract")
        seconds = time.perf_counter() - start
        rate = len(paths) / seconds
        results.row("hw3_2", f"extract: {len(paths)} JPEGs -> HDF5 in {seconds:.1f} s at batch "
                    f"{batch}, {workers} workers, {cfg.precision} ({rate:.0f} images/s; the course's "
                    f"12,393 images: {12393 / rate:.0f} s)", kind="extract", images=len(paths),
                    seconds=seconds, images_per_s=rate, batch=batch, workers=workers,
                    precision=cfg.precision, all_images_s=12393 / rate)
        out.unlink()


def run_hw3_2(ctx, results, deadline, cmd, env, log, n, out_json, encoder_cfg, decode_cfg):
    """One run of hw3_2.sh as a subprocess; a row of results."""
    with tempfile.TemporaryDirectory() as tmp:
        if out_json.exists():
            out_json.unlink()
        with open(log, "w") as f:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT)
            try:
                code = proc.wait(timeout=max(1.0, deadline.left() - 1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = "killed at the step's cap"
            seconds = time.perf_counter() - start
    captions = json.loads(out_json.read_text()) if out_json.is_file() else {}
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    ok = code == 0 and len(captions) == n and all(captions.values())
    results.row("hw3_2", f"hw3_2.sh: {n} images in {seconds:.1f} s end to end, Python "
                f"start-up included ({n / seconds:.1f} captions/s), batch {decode_cfg.batch_size}, "
                f"exit {code}, {len(captions)} captions" + ("" if ok else f"; log tail: {tail}"),
                images=n, seconds=seconds, captions_per_s=n / seconds, exit=code,
                captioned=len(captions), ok=ok, python=hw3_python(),
                encoder=encoder_cfg.name, precision=encoder_cfg.precision,
                decode=f"{decode_cfg.method} {decode_cfg.beam_size}, batch "
                       f"{decode_cfg.batch_size}, {decode_cfg.max_new_tokens} new tokens",
                note="random weights: no beam ends early, every caption runs all "
                     f"{decode_cfg.max_new_tokens} new tokens (an upper bound); the encoder's "
                     "weights file is hashed for its id (the real release names hub weights)")
    if not ok:
        raise RuntimeError(f"hw3_2.sh: exit {code}, {len(captions)} of {n} captions: {tail}")


# --- compile ------------------------------------------------------------------------------------

def compile_run(ctx, variant, mode, batches, batch, group_by_image=False):
    """(first pass s, steady s per step, first-pass losses) of `variant` under train.speed.compile
    = mode, from the same initial weights for every mode."""
    from bench.common import IdTokenizer, training_steps
    from speed import SpeedConfig
    from training.loop import TrainConfig
    model = build_variant_on(ctx, variant)
    config = TrainConfig(batch_size=batch, group_by_image=group_by_image,
                         speed=SpeedConfig(compile=mode))
    timer = StepTimer(ctx.device)
    with compile_backend(ctx.device), training_steps(
            model, ctx.table, IdTokenizer(ctx.decoder.config.vocab_size - 1), config,
            ctx.device) as step:
        timer.start()
        losses = [step(b, config.lr).item() for b in batches]
        first, _ = timer.stop()
        timer.start()
        for b in batches:
            step(b, config.lr)
        steady, _ = timer.stop()
    return first, steady / len(batches), losses


def measure_compile(ctx, variant, mode, batches, batch):
    eager_first, eager_step, eager_losses = compile_run(ctx, variant, "none", batches, batch)
    first, step_s, losses = compile_run(ctx, variant, mode, batches, batch)
    diff = max(abs(a - b) / abs(a) for a, b in zip(eager_losses, losses))
    return dict(first_pass_s=first, eager_first_pass_s=eager_first, step_ms=1000 * step_s,
                eager_step_ms=1000 * eager_step, speedup=eager_step / step_s,
                captions_per_s=batch / step_s, loss_rel_diff=diff)


def step_compile(deadline, ctx, results):
    import torch
    from bench.common import caption_batches
    batch = (SMALL if ctx.args.small else REAL)["batches"][0]
    n = 3 if ctx.args.small else 8
    mode = "reduce-overhead"
    batches = caption_batches(len(ctx.table), n, batch, ctx.decoder.config.vocab_size, seed=11)
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:   # a cold compilation, as a first dvc repro's
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_inductor_")
    print(f"train.speed.compile = {mode}, batch {batch}, {n} batches: a first pass (compilation, "
          f"graph recording) then the same batches again (steady), against eager on them"
          + ("; CPU: dynamo with the eager backend (inductor's C++ build takes minutes here), "
             "the times mean nothing" if ctx.device.type != "cuda" else ""), flush=True)
    for variant in ctx.args.compile_variants:
        if deadline.left() < 10:
            results.skip("compile", variant, variant=variant, batch=batch)
            continue
        ids = dict(variant=variant, batch=batch, mode=mode)
        m = guarded(results, "compile", variant,
                    lambda: measure_compile(ctx, variant, mode, batches, batch), **ids)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        if m is not None:
            results.row("compile", f"compile {variant:<22}: first pass {m['first_pass_s']:.1f} s "
                        f"(eager {m['eager_first_pass_s']:.1f} s), then {m['step_ms']:.1f} ms/step "
                        f"vs eager {m['eager_step_ms']:.1f} ms: {m['speedup']:.2f}x; losses within "
                        f"{m['loss_rel_diff']:.1e} (relative)", **ids, **m)


# --- the table ----------------------------------------------------------------------------------

def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(results):
    d = results.data
    m = d["meta"]
    lines = [f"GPU {m.get('gpu')}, torch {m.get('torch')} (CUDA {m.get('cuda_build')}), "
             f"{m.get('cpu_cores')} CPU cores, {m.get('started')}; {m.get('models')}; MFU against "
             f"{m.get('peak')}", "", "| step | status | seconds | cap |", "|---|---|---:|---:|"]
    lines += [f"| {k} | {v.get('status')} | {v.get('seconds', '-')} | {v.get('cap_s', '-')} |"
              for k, v in d["steps"].items()]
    rows = results.rows("train")
    if rows:
        lines += ["", f"Training steps, eager (host-bound share: {HOST_BOUND_METHOD})", "",
                  "| variant | trainable | batch | batches | captions/s | ms/step | "
                  "device busy ms | host-bound | TFLOP/s | MFU | peak GiB | epoch (train only) |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['trainable_m']}M | {r['batch']} | {r['batches']} | "
                  f"{r['captions_per_s']:,.0f} | {r['step_ms']:.1f} | {fmt(r['busy_ms'], '.1f')} | "
                  f"{fmt(r['host_bound'], '.0%')} | {r['tflops']:.1f} | {fmt(r['mfu'], '.1%')} | "
                  f"{fmt(r['peak_gib'], '.1f')} | {r['epoch_train_s']:.0f} s |" for r in rows]
    rows = results.rows("epoch")
    if rows:
        lines += ["", f"Whole epoch at batch {rows[0]['batch']}: {TRAIN_CAPTIONS:,} captions + the "
                  "per-epoch evaluation (val loss on 200 images x 5 captions, greedy decoding of "
                  "200 images; --small: fewer)", "",
                  "| variant | evaluation s | of which greedy s | epoch s, random batches | "
                  "epoch s, by image |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['eval_s']:.1f} | {r['greedy_s']:.1f} | "
                  f"{fmt(r['epoch_s_random'], '.1f')} | {fmt(r['epoch_s_by_image'], '.1f')} |"
                  for r in rows]
    for r in [r for r in results.rows("hw3_2") if r.get("kind") != "extract"]:
        lines += ["", "| hw3_2.sh end to end (a subprocess, start-up included) | images | seconds "
                  "| captions/s | exit | decode | python |", "|---|---:|---:|---:|---|---|---|",
                  f"| {r['encoder']} {r['precision']} + gated_cross:lora | {r['images']} | "
                  f"{r['seconds']:.1f} | {r['captions_per_s']:.1f} | {r['exit']} | {r['decode']} | "
                  f"{r['python']} |", "", f"({r['note']})"]
    rows = results.rows("compile")
    if rows:
        lines += ["", "| train.speed.compile | variant | first pass s (eager) | ms/step (eager) | "
                  "vs eager | loss rel. diff |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['mode']}, batch {r['batch']} | {r['variant']} | {r['first_pass_s']:.1f} "
                  f"({r['eager_first_pass_s']:.1f}) | {r['step_ms']:.1f} ({r['eager_step_ms']:.1f})"
                  f" | {r['speedup']:.2f}x | {r['loss_rel_diff']:.1e} |" for r in rows]
    failed = [r for step in results.data["steps"] for r in results.rows(step, failed=True)]
    if failed:
        lines += ["", "Not measured:"] + [
            f"- {r['step']} {r.get('variant', '')} {r.get('batch', '')} {r.get('batches', '')}: "
            f"{r.get('error') or r.get('skipped')}" for r in failed]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="folder for gpu_results.json, gpu_table.md, hw3_2_log.txt (default $OUT)")
    p.add_argument("--small", action="store_true",
                   help="toy sizes: every step, in under a minute on a CPU")
    p.add_argument("--budget", type=float, default=360,
                   help="seconds from the start for everything; each step also has its own cap")
    p.add_argument("--steps", nargs="+", default=["train", "hw3_2", "epoch", "compile"],
                   choices=["train", "hw3_2", "epoch", "compile"],
                   help="which steps, in this order")
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--compile-variants", nargs="+", default=COMPILE_VARIANTS)
    p.add_argument("--hw3-batches", nargs="+", type=int, default=[64],
                   help="hw3_2.sh --batch-size for each run of the hw3_2 step")
    p.add_argument("--extract-images", type=int, default=0,
                   help="the hw3_2 step then also times extraction of this many of its JPEGs")
    p.add_argument("--extract-batches", nargs="+", type=int, default=[256])
    args = p.parse_args(argv)
    results = Results(args.out)
    budget = Deadline(START + args.budget)
    results.meta(command=" ".join(sys.argv), budget_s=args.budget, caps_s=CAPS)
    print(f"bench.gpu: budget {args.budget:.0f} s from the start; caps " +
          ", ".join(f"{k} {v} s" for k, v in CAPS.items()), flush=True)
    ok = run_step("checks", results, budget, lambda deadline: checks(args, results))
    if not ok:
        if ok is None:
            print(f"STOP: the imports and CUDA start did not finish within {CAPS['checks']} s "
                  "(or failed: above)", flush=True)
        status = results.data["steps"]["checks"]["status"]
        results.step("checks", status=f"{status}; the run stopped")
        return 2
    import torch
    # toy sizes on a CPU: one thread (tiny operators gain nothing from more, and lose much when
    # another process shares the cores)
    torch.set_num_threads(1 if args.small else min(8, os.cpu_count() or 1))
    ctx = run_step("build", results, budget, build, args, results)
    if ctx is None:
        return 1
    steps = {"train": step_train, "hw3_2": step_hw3_2, "epoch": step_epoch,
             "compile": step_compile}
    for name in args.steps:
        run_step(name, results, budget, steps[name], ctx, results)
    text = table(results)
    print(f"\nall done in {time.monotonic() - START:.0f} s\n\n{text}", flush=True)
    if results.out:
        (results.out / "gpu_table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
