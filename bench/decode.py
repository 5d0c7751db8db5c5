"""Decoding: what the key/value cache and batching each buy, measured apart and together, side
by side in one run (interleaved rounds; the median and the spread of each ratio printed).

    python -m bench.decode --small                      # toy size, about a minute on 2 CPU cores
    python -m bench.decode                              # real size, ~10 minutes on 2 CPU cores
    python -m bench.decode --device cuda --images 64 --rounds 5

Four sides decode the same N images (gated_cross:lora, its zero-initialised parts perturbed;
random weights and random image tokens) with the same DecodeConfig, greedy and beam 5, every
caption exactly --max-new-tokens long (the end token is masked until then, so every side does
the same work and the token ids can be compared):
  A  cached, batch of N       captioning.decoding.generate(cached=True) on the N images at once:
                              CachedStepper, each step runs only the newest token of every row
                              (N rows greedy, N x 5 beam) against the key/value cache
  B  no cache, batch of N     captioning.decoding._decode(NaiveStepper, ...) on the same N images
                              at once: every step re-runs the whole sequence of every row (image
                              keys/values included) through the same model forward
  C  cached, one at a time    generate(cached=True) N times, one image each
  D  no cache, one at a time  generate(cached=False): NaiveStepper one image at a time, the way
                              students write it
Ratios, captions/s of the first side over the second, in each round:
  (1) the KV cache alone, at the same batch size N:  A / B   (and at one image: C / D)
  (2) batching alone, both cached:                   A / C   (and both without cache: B / D)
  (3) both together vs the students' way:            A / D
"""
import argparse
import statistics

import torch

from bench.common import (DEMO_TOKENS, Stopwatch, add_device_args, build_variant, demo_decoder,
                          real_decoder, use_device)
from captioning.decoding import DecodeConfig, NaiveStepper, _decode, generate

SIDES = {
    "A": "cached, batch of N",
    "B": "no cache, batch of N",
    "C": "cached, one image at a time",
    "D": "no cache, one image at a time (students)",
}
RATIOS = [  # (label, numerator, denominator); the first three are the issue's
    ("(1) KV cache alone, batch of N", "A", "B"),
    ("(2) batching alone, cached", "A", "C"),
    ("(3) cache + batching vs students", "A", "D"),
    ("    KV cache alone, one image at a time", "C", "D"),
    ("    batching alone, no cache", "B", "D"),
]


@torch.inference_mode()
def naive_batch(model, visual, config, eot):
    """Side B: the naive stepper on the whole batch (generate(cached=False) would loop over the
    images). _decode is valid for a batch with either stepper: NaiveStepper keeps every row's ids
    and selects rows of them and of the image context on beam reorders and finished rows."""
    return _decode(NaiveStepper, model, visual, config, eot, capture=False, generator=None)


def sides(model, visual, config, eot):
    n = len(visual)
    return {
        "A": lambda: generate(model, visual, config, eot),
        "B": lambda: naive_batch(model, visual, config, eot),
        "C": lambda: [h for i in range(n) for h in generate(model, visual[i:i + 1], config, eot)],
        "D": lambda: generate(model, visual, config, eot, cached=False),
    }


def spread(values):
    """'median [min - max]'."""
    return f"{statistics.median(values):.2f} [{min(values):.2f} - {max(values):.2f}]"


def bench_method(model, visual, method, args, device):
    """{side: [captions/s per round]}, {ratio label: [per round]}, {side: token ids of round 1}."""
    eot = model.config.decoder.vocab_size - 1   # GPT-2's <|endoftext|>; any id does for timing
    config = DecodeConfig(method=method, beam_size=args.beam_size,
                          max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    warm = DecodeConfig(method=method, beam_size=args.beam_size, max_new_tokens=2)
    for run in sides(model, visual[:2], warm, eot).values():   # warm-up: every code path once
        run()
    runs = sides(model, visual, config, eot)
    rates = {side: [] for side in SIDES}
    ids = {}
    order = list(SIDES)
    for r in range(args.rounds):
        for side in order[r % 4:] + order[:r % 4]:   # rotated: no side always first or last
            with Stopwatch(device) as sw:
                out = runs[side]()
            assert all(len(h.tokens) == args.max_new_tokens for h in out)
            rates[side].append(len(visual) / sw.seconds)
            ids.setdefault(side, [h.tokens for h in out])
        print(f"  {method} round {r + 1}: " + ", ".join(
            f"{side} {rates[side][-1]:.2f}" for side in SIDES) + " captions/s", flush=True)
    ratios = {label: [a / b for a, b in zip(rates[num], rates[den])] for label, num, den in RATIOS}
    return rates, ratios, ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true",
                   help="toy size (the demo world's GPT-2 4 x 128 and 10 x 128 image tokens): a "
                        "quick check")
    p.add_argument("--images", type=int, default=0, help="N (default: real 4, --small 8)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the four sides")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--methods", nargs="+", choices=["greedy", "beam"], default=["greedy", "beam"])
    add_device_args(p)
    args = p.parse_args(argv)
    device = use_device(args)
    n = args.images or (8 if args.small else 4)
    if args.small:
        decoder, source = demo_decoder()
        tokens, width = DEMO_TOKENS
    else:
        decoder, source = real_decoder()
        tokens, width = 257, 1024   # ViT-L/14
    model = build_variant(decoder, "gated_cross:lora", width, tokens, perturb=True)
    model = model.to(device).eval()
    visual = torch.randn(n, tokens, width, generator=torch.Generator().manual_seed(1)).to(device)
    print(f"device {device}, {args.threads} CPU threads; gated_cross:lora on {source}, image "
          f"tokens {tokens} x {width} (random); N = {n} images, {args.max_new_tokens} new tokens "
          f"each (end token masked until then), {args.rounds} interleaved rounds")
    print("sides:\n" + "\n".join(f"  {k}  {v}" for k, v in SIDES.items()))
    print("ratio = captions/s of the first side / of the second, per round: median [min - max]")
    results = {}
    for method in args.methods:
        label = "greedy" if method == "greedy" else f"beam {args.beam_size}"
        rates, ratios, ids = bench_method(model, visual, method, args, device)
        same = {s: ids[s] == ids["A"] for s in "BCD"}
        results[label] = rates, ratios
        for ratio, num, den in RATIOS:
            print(f"  {label}: {ratio} = {num} / {den}: {spread(ratios[ratio])}x")
        print(f"  {label}: token ids the same as A's: " +
              ", ".join(f"{s} {'yes' if v else 'NO'}" for s, v in same.items()), flush=True)

    print("\n| decoding | side | what | captions/s, median [min - max] |\n|---|---|---|---|")
    for label, (rates, _) in results.items():
        for side, what in SIDES.items():
            print(f"| {label} | {side} | {what} | {spread(rates[side])} |")
    print("\n| decoding | ratio | sides | median | min | max |\n|---|---|---|---:|---:|---:|")
    for label, (_, ratios) in results.items():
        for ratio, num, den in RATIOS:
            v = ratios[ratio]
            print(f"| {label} | {ratio.strip()} | {num} / {den} | {statistics.median(v):.2f}x | "
                  f"{min(v):.2f}x | {max(v):.2f}x |")
    return results


if __name__ == "__main__":
    main()
