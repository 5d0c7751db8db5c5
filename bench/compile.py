"""Training eager vs compiled (`train.speed.compile`), side by side in one run: the time of the first
pass (where compilation and CUDA-graph recording happen), steady captions/s, the speed-up, peak
GPU memory, and how far the compiled losses are from the eager ones on the same batches. A third
setting, eager at the compiled run's padded caption widths, tells what the padding alone costs.

    python -m bench.compile                       # CPU: every size, mode "default"
    python -m bench.compile --device cuda --sizes real --batch-size 64 --steps 30 \\
        --variants gated_cross:lora gated_cross:adapter gated_cross:prefix_tuning gated_cross:prompt_tuning \\
                   gated_cross:adaption_prompt visual_prefix:lora     # mode "reduce-overhead" (CUDA graphs)
    python -m bench.compile --sizes overhead --batch-size 12 --batches random "by image"

All three settings take `bench.common.training_steps`, the step `train()` takes (fused AdamW,
bf16 autocast and the other switches of train.speed as the pipeline sets them: bf16-stored Linear
weights and image tokens on a GPU; only `compile` differs), on a random fp16
image-token table of the size's shape and random captions of 8-20 tokens, so that the batches have
several widths, as an epoch's do. Each setting starts from the same weights and runs the same
batches: a first pass, then `--rounds` timed passes (best kept); each setting runs on every kind
of `--batches` (bench.common.BATCHES; "by image": each image's 5 captions together, with
`train.group_by_image`, so that a compiled loss takes an image_index in every batch). Batches of 5
captions or fewer often hold a single image, and torch.compile compiles once more for that size-1
image dimension: use larger ones to see the steady state. Sizes: the demo world's, the real
one (ViT-L/14 tokens, GPT-2 small), and "overhead": GPT-2 small's operators with next to no
arithmetic, where a step costs what the framework spends per operator. Inductor's compiled code
goes to a new temp folder (unless TORCHINDUCTOR_CACHE_DIR is set), so the first pass includes a
cold compilation, as on a first `dvc repro`; later runs on a machine reuse its cache.
"""
import argparse
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from bench.common import (IdTokenizer, Stopwatch, add_batches_arg, add_device_args,
                          batches_by_kind, build_variant, demo_decoder, fmt_rate, peak_gib,
                          peak_reset, real_decoder, sync, training_steps, use_device)
from captioning.gpt2 import GPT2, GPT2Config
from speed import COMPILE_MODES, COMPILE_WIDTH_STEP, SpeedConfig
from training.loop import TrainConfig

SHAPES = {"demo": (65, 128), "real": (257, 1024), "overhead": (8, 64)}   # image tokens x width


def overhead_decoder():
    """GPT-2 small's 12 blocks and 12 heads at a width of 96 and a vocabulary of 512: the same
    operators per step as the real size with next to no arithmetic, so the step time is the
    framework's per-operator cost, which bounds a real-size step on a GPU."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, block_size=128, n_layer=12, n_head=12, n_embd=96)
    return GPT2(config), "GPT-2 small's 12 x 12 heads at width 96, vocab 512 (operator cost)"


DECODERS = {"demo": demo_decoder, "real": real_decoder, "overhead": overhead_decoder}


@dataclass
class PaddedEager(SpeedConfig):
    """train.speed of eager training with the caption widths a compiled run pads to."""

    @property
    def width_multiple(self):
        return COMPILE_WIDTH_STEP


def label(mode):
    padded = f"eager, widths padded to x{COMPILE_WIDTH_STEP}"
    return {"none": "eager", "padded": padded}.get(mode, f"compiled, {mode}")


def run_setting(model, tokens, batches, tok, config, device, rounds):
    """(seconds of the first pass, best seconds of a later pass, the first pass's losses)."""
    peak_reset(device)
    with training_steps(model, tokens, tok, config, device) as step:
        with Stopwatch(device) as first:
            losses = [step(b, config.lr).item() for b in batches]
        best = float("inf")
        for _ in range(rounds):
            with Stopwatch(device) as sw:   # no wait for the device per step, as in train()
                for b in batches:
                    step(b, config.lr)
            best = min(best, sw.seconds)
    return first.seconds, best, losses


def bench_size(size, args, device, log=print):
    decoder, source = DECODERS[size]()
    n_tokens, width = SHAPES[size]
    vocab = decoder.config.vocab_size
    tok = IdTokenizer(vocab - 1)
    batch_size = args.batch_size or {"demo": 32, "real": 4, "overhead": 4}[size]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(args.images, n_tokens, width, generator=g).half()
    composed = batches_by_kind(args.batches, args.images, args.steps, batch_size, vocab)
    log(f"{size}: decoder {source}; image tokens {n_tokens} x {width}; {args.steps} batches of "
        f"{batch_size}")
    rows_out = []
    for variant in args.variants:
        measured = {}
        for kind, batches in composed.items():
            for mode in ("none", "padded", args.mode):
                model = build_variant(decoder, variant, width, n_tokens)
                speed = PaddedEager() if mode == "padded" else SpeedConfig(compile=mode)
                config = TrainConfig(batch_size=batch_size, group_by_image=kind == "by image",
                                     speed=speed)
                first, steady, losses = run_setting(model, tokens, batches, tok, config, device,
                                                    args.rounds)
                measured[mode, kind] = (first, steady, losses, peak_gib(device))
                log(f"  {size} {variant} {label(mode)}, {kind} batches: first pass {first:.1f} s, "
                    f"then {batch_size * len(batches) / steady:.1f} captions/s")
                del model
                sync(device)
        # Speed and losses against eager on the same batches.
        results = [dict(size=size, variant=variant, setting=f"{label(mode)}, {kind} batches",
                        first_s=first, rate=batch_size * args.steps / steady,
                        speedup=measured["none", kind][1] / steady, mem=mem,
                        loss_diff=max(abs(a - b) / abs(a)
                                      for a, b in zip(measured["none", kind][2], losses)))
                   for (mode, kind), (first, steady, losses, mem) in measured.items()]
        log(table(results))   # now, in case a time limit stops the run before the end
        rows_out += results
    return rows_out


def table(rows):
    lines = [f"{'size':<8} {'variant':<22} {'setting':<48} {'first pass s':>12} "
             f"{'captions/s':>11} {'vs eager':>9} {'peak GiB':>9} {'max loss rel. diff':>19}"]
    for r in rows:
        lines.append(f"{r['size']:<8} {r['variant']:<22} {r['setting']:<48} {r['first_s']:>12.1f} "
                     f"{fmt_rate(r['rate']):>11} {r['speedup']:>8.2f}x {r['mem']:>9.1f} "
                     f"{r['loss_diff']:>19.1e}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["overhead", "demo", "real"], choices=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=["gated_cross:lora"],
                   help="BRIDGE:PEFT, e.g. gated_cross:lora visual_prefix:none cross:adapter")
    p.add_argument("--mode", choices=COMPILE_MODES[1:], default=None,
                   help="torch.compile mode (default: reduce-overhead on CUDA, else default)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="captions per step (0: demo 32, real 4, overhead 4)")
    p.add_argument("--steps", type=int, default=6, help="batches per pass")
    p.add_argument("--rounds", type=int, default=2, help="timed passes after the first; best kept")
    p.add_argument("--images", type=int, default=64, help="rows of the random image-token table")
    add_batches_arg(p)
    add_device_args(p)
    args = p.parse_args(argv)
    device = use_device(args)
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_compile_")
    args.mode = args.mode or ("reduce-overhead" if device.type == "cuda" else "default")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.threads} CPU threads, mode "
          f"{args.mode}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows = []
    for size in args.sizes:
        rows += bench_size(size, args, device)
    print()
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
