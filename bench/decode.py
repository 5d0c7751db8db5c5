"""Captions per second: naive decoding (one image at a time, the whole sequence re-run for every
token, as students write it) against cached batched decoding (captioning/decoding.py), greedy and
beam search, for a demo-size and a real-size (GPT-2 small) captioner on random images.

    python -m bench.decode                      # a few minutes on 2 CPU cores
    python -m bench.decode --real-naive 4 --real-cached 32 --device cuda

Both decoders run the same model forward; the end token is suppressed until --max-new-tokens so
that both do exactly the same amount of work (and the same tokens come out: checked).
"""
import argparse
import time

import torch

from bench.common import add_device_args, build_variant, demo_decoder, real_decoder, use_device
from captioning.decoding import DecodeConfig, generate


def demo_model(args):
    decoder, source = demo_decoder()
    return build_variant(decoder, "gated_cross:lora", args.demo_visual_width, args.demo_visual_tokens,
                         perturb=True).eval(), source


def real_model():
    decoder, source = real_decoder()
    return build_variant(decoder, "gated_cross:lora", 1024, 257, perturb=True).eval(), \
        f"{source}, 257x1024 visual"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def bench_model(name, model, n_naive, n_cached, args, device):
    model = model.to(device)
    cfg = model.config
    eot = cfg.decoder.vocab_size - 1  # GPT-2's <|endoftext|>; any id does for timing
    visual = torch.randn(max(n_naive, n_cached), cfg.visual_tokens, cfg.visual_width,
                         generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    for method in ("greedy", "beam"):
        config = DecodeConfig(method=method, beam_size=args.beam_size,
                              max_new_tokens=args.max_new_tokens,
                              min_new_tokens=args.max_new_tokens)
        generate(model, visual[:1], DecodeConfig(method=method, beam_size=2, max_new_tokens=2),
                 eot)  # warm-up
        naive, t_naive = timed(lambda: generate(model, visual[:n_naive], config, eot, cached=False))
        cached, t_cached = timed(lambda: generate(model, visual[:n_cached], config, eot))
        same = [h.tokens for h in naive] == [h.tokens for h in cached[:n_naive]]
        assert all(len(h.tokens) == args.max_new_tokens for h in naive + cached)
        label = "greedy" if method == "greedy" else f"beam {args.beam_size}"
        rows.append((name, label, n_naive / t_naive, n_cached / t_cached, same))
        print(f"  {name} {label}: naive {n_naive} images in {t_naive:.1f} s, "
              f"cached {n_cached} images in {t_cached:.1f} s, same ids: {same}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--demo-naive", type=int, default=8, help="images, naive decoder, demo model")
    p.add_argument("--demo-cached", type=int, default=64, help="images (one batch), demo model")
    p.add_argument("--real-naive", type=int, default=1, help="images, naive decoder, real size")
    p.add_argument("--real-cached", type=int, default=8, help="images (one batch), real size")
    p.add_argument("--demo-visual-tokens", type=int, default=10)  # the demo CLIP: 1 + 3 x 3
    p.add_argument("--demo-visual-width", type=int, default=128)
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    add_device_args(p)
    args = p.parse_args(argv)
    device = use_device(args)
    print(f"device {device}, {args.threads} threads, {args.max_new_tokens} new tokens per caption")

    rows = []
    if not args.skip_demo:
        model, source = demo_model(args)
        print(f"demo: {source}", flush=True)
        rows += bench_model("demo", model, args.demo_naive, args.demo_cached, args, device)
    if not args.skip_real:
        model, source = real_model()
        print(f"real: {source}", flush=True)
        rows += bench_model("real", model, args.real_naive, args.real_cached, args, device)
        del model

    print(f"\n{'model':<6} {'method':<8} {'naive cap/s':>12} {'cached cap/s':>13} {'speed-up':>9}"
          f"  same ids")
    for name, label, naive, cached, same in rows:
        print(f"{name:<6} {label:<8} {naive:>12.3f} {cached:>13.3f} {cached / naive:>8.1f}x"
              f"  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
