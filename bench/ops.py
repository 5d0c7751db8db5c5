"""ATen operator calls per training step, per PEFT variant: what bounds training on a GPU.

On an H100 a real-size training step of batch 64 is launch-bound (docs/performance.md): the
host spends ~70 ms issuing ~1100 kernels while the GPU computes for ~17 ms, so every operator
call saved is host time saved. The number of calls per step does not depend on the batch size
(since caption_batch pads with whole-array operations) and barely on the device (the CPU's and
the GPU's autocast and attention kernels differ in a few calls), so it is counted here on the
CPU, exactly, at a small batch: the second step as training.loop runs it on a GPU (bf16
autocast, fused AdamW, gradient clipping), the batch's preparation included, side by side with
the switches of `train.speed` as the pipeline sets them ("as is": Linear weights stored bf16
with fp32 masters for the trainable ones, the table gathered with numpy, which makes no operator
calls) and all off ("speed off": every Linear weight cast by autocast at every use, the rows
gathered by torch's index). On a GPU the gather and the copies to it add a few calls.

    python -m bench.ops                      # real size, every variant, ~40 s on 2 cores
    python -m bench.ops --size demo

"calls" counts every operator; "non-view" leaves out views (view, transpose, split, detach ...),
which only make a new tensor header; the non-view calls run a kernel (on the GPU, or on the host
for the batch's preparation).
"""
import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import (SPEED_OFF, IdTokenizer, build_variant, demo_decoder, random_captions,
                          real_decoder, training_steps)
from speed import SpeedConfig
from training.loop import TrainConfig

VARIANTS = ["gated_cross:lora", "gated_cross:adapter", "gated_cross:prefix_tuning", "gated_cross:prompt_tuning",
            "gated_cross:adaption_prompt", "visual_prefix:lora"]
SPEEDS = {"speed off": SPEED_OFF, "as is": SpeedConfig()}   # train.speed settings compared
SIZES = {"real": (real_decoder, 257, 1024), "demo": (demo_decoder, 10, 128)}   # visual tokens, width


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside, by (name, is a view)."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket), func.is_view] += 1
        return func(*args, **(kwargs or {}))

    def total(self, views=True):
        return sum(n for (_, is_view), n in self.calls.items() if views or not is_view)


def count_step(decoder, variant, visual_tokens, visual_width, batch_size, speed):
    """(OperatorCounter of the second training step under train.speed = `speed`, number of
    trainable tensors)."""
    model = build_variant(decoder, variant, visual_width, visual_tokens, perturb=True).train()
    tokens = torch.randn(batch_size, visual_tokens, visual_width).half()
    tokenizer = IdTokenizer(decoder.config.vocab_size - 1)
    captions = random_captions(batch_size, decoder.config.vocab_size, seed=1)
    batch = list(zip(range(batch_size), captions))
    # bf16 autocast and fused AdamW, as on a GPU: a GPU step's operators, on the CPU
    config = TrainConfig(batch_size=batch_size, precision="bf16", speed=speed)
    counter = OperatorCounter()
    with training_steps(model, tokens, tokenizer, config, "cpu", fused=True) as step:
        step(batch, config.lr)   # the first step creates the optimiser state
        with counter:
            step(batch, config.lr)
    return counter, sum(p.requires_grad for p in model.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, default="real")
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top", type=int, default=0, help="also list each variant's most called non-view operators")
    args = ap.parse_args()
    make_decoder, visual_tokens, visual_width = SIZES[args.size]
    decoder, about = make_decoder()
    print(f"{args.size} size: {about}; {visual_tokens} x {visual_width} image tokens; "
          f"batch {args.batch_size}\n")
    print("| variant | trainable tensors | " + " | ".join(
        f"calls / step ({name}) | non-view calls / step ({name})" for name in SPEEDS) + " |")
    print("|---|---:|" + "---:|---:|" * len(SPEEDS))
    for variant in args.variants:
        counters = {}
        for name, speed in SPEEDS.items():
            counters[name], n_params = count_step(decoder, variant, visual_tokens, visual_width,
                                                  args.batch_size, speed)
        print(f"| {variant} | {n_params} | " + " | ".join(
            f"{c.total():,} | {c.total(views=False):,}" for c in counters.values()) + " |",
            flush=True)
        for name, counter in counters.items():
            non_view = Counter({op: n for (op, is_view), n in counter.calls.items() if not is_view})
            for op, n in non_view.most_common(args.top):
                print(f"|   {op} ({name}) | | | {n} |")


if __name__ == "__main__":
    main()
