"""LoRA's update computed two ways, side by side in one run: loralib's own MergedLinear forward
(the dense B@A [out, in] built at every call, placed with a boolean mask, then a full-width
product) against captioning.peft.lora.MergedLinear's low-rank forward ((x A^T) B^T per enabled part).
Training steps and beam-5 decoding, captions/s, at the demo and the real size (gated_cross:lora,
LoRA on c_attn's q and v, the pipeline's default).

    python -m bench.lora                    # ~2 minutes on 2 CPU cores
    python -m bench.lora --device cuda --real-batch 64 --real-images 64

Same module objects and weights for both; the rounds alternate the two and keep each one's best.
The beam search's token ids are compared between the two (their sums differ only in rounding).
"""
import argparse
import contextlib

import loralib
import torch

from bench.common import (DEMO_TOKENS, IdTokenizer, Stopwatch, add_device_args, build_variant,
                          caption_batches, demo_decoder, real_decoder, training_steps, use_device)
from bench.train import time_source
from captioning.decoding import DecodeConfig, generate
from captioning.peft.lora import MergedLinear
from training.loop import TrainConfig

FORWARDS = {"loralib": loralib.MergedLinear.forward, "low-rank": MergedLinear.forward}


@contextlib.contextmanager
def lora_forward(name):
    """Every captioning.peft.lora.MergedLinear computes its update the `name` way inside."""
    ours = MergedLinear.forward
    MergedLinear.forward = FORWARDS[name]
    try:
        yield
    finally:
        MergedLinear.forward = ours


def bench_size(size, decoder, visual_shape, batch, images, args, device):
    """{(measured, forward): captions/s} and whether the beams' token ids agree."""
    model = build_variant(decoder, "gated_cross:lora", visual_shape[1], visual_shape[0], perturb=True)
    model = model.to(device)
    eot = decoder.config.vocab_size - 1
    g = torch.Generator().manual_seed(1)
    visual = torch.randn(images, *visual_shape, generator=g).to(device)
    beam = DecodeConfig(method="beam", beam_size=5, max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens)
    rates, ids = {}, {}
    model.eval()
    with torch.no_grad():
        for _ in range(args.rounds):
            for name in FORWARDS:
                with lora_forward(name), Stopwatch(device) as sw:
                    ids[name] = [h.tokens for h in generate(model, visual, beam, eot)]
                key = (f"beam 5, {args.new_tokens} tokens", name)
                rates[key] = max(rates.get(key, 0.0), images / sw.seconds)

    config = TrainConfig(batch_size=batch)
    batches = caption_batches(images, args.steps, batch, decoder.config.vocab_size)
    with training_steps(model, visual, IdTokenizer(eot), config, device) as step:
        for round_ in range(args.rounds):
            for name in FORWARDS:
                with lora_forward(name):
                    step_s = time_source(step, None, batches, config, device,
                                         warmup=1 if round_ == 0 else 0)
                key = (f"training step, batch {batch}", name)
                rates[key] = max(rates.get(key, 0.0), batch / step_s)
    return rates, ids["loralib"] == ids["low-rank"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["demo", "real"], choices=["demo", "real"])
    p.add_argument("--demo-batch", type=int, default=64, help="captions per training step")
    p.add_argument("--demo-images", type=int, default=64, help="images decoded in one batch")
    p.add_argument("--real-batch", type=int, default=8)
    p.add_argument("--real-images", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per round")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    add_device_args(p)
    args = p.parse_args(argv)
    device = use_device(args)
    print(f"device {device}, {args.threads} CPU threads, best of {args.rounds} rounds")
    lines = [f"{'size':<5} {'measured':<26} {'loralib cap/s':>14} {'low-rank cap/s':>15} "
             f"{'speed-up':>9}  same beam ids"]
    for size in args.sizes:
        if size == "demo":
            decoder, source = demo_decoder()
            shape, batch, images = DEMO_TOKENS, args.demo_batch, args.demo_images
        else:
            decoder, source = real_decoder()
            shape, batch, images = (257, 1024), args.real_batch, args.real_images  # ViT-L/14
        print(f"{size}: {source}, image tokens {shape[0]} x {shape[1]}", flush=True)
        rates, same = bench_size(size, decoder, shape, batch, images, args, device)
        for what in dict.fromkeys(k for k, _ in rates):
            old, new = rates[(what, "loralib")], rates[(what, "low-rank")]
            lines.append(f"{size:<5} {what:<26} {old:>14.1f} {new:>15.1f} {new / old:>8.2f}x  "
                         f"{'-' if what.startswith('training') else 'yes' if same else 'NO'}")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
