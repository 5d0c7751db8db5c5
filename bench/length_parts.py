"""Training steps with their batches computed whole or as sub-batches of similar caption length
(`train.speed.length_parts`, `demo_gpt2.length_parts`), side by side, on the demo world's own
captions: a batch is padded to its longest caption, so what this trades depends on their lengths.

    python -m bench.length_parts          # ~3 minutes on 2 CPU cores, after `dvc repro demo_gpt2`

Two trainers, each in interleaved rounds (every setting once per round), median [min - max] of
ms per step and of the speed-up against the first setting within each round:
  captioner  training.loop.train_step on gated_cross:lora over the demo GPT-2, batches of
             --batch-size demo train captions, each of a distinct image (random image tokens of
             the demo CLIP's shape), parts = each of --parts
  demo_gpt2  demo.lm_pretrain's step (lm_loss, backward, clipping, AdamW) on the same batches,
             parts = each of --parts, at each of --lm-threads torch threads
Every setting runs the same batches from the same weights; only the one named factor differs.
"""
import argparse
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import DEMO_DECODER, DEMO_TOKENS, build_variant, demo_decoder, training_steps
from captioning.gpt2 import GPT2
from captioning.tokenizer import Tokenizer
from demo.lm_pretrain import LMConfig, lm_loss, make_optimizer
from demo.vocab import read_captions
from speed import SpeedConfig
from training.loop import TrainConfig

TEXT = Path("data/demo/text")
CAPTIONS = Path("data/demo/hw3_data/p2_data/train.json")


def demo_batches(batch_size, n_batches, seed=0):
    """(tokenizer, batches of (image row, caption ids)): demo train captions in random order."""
    for path in (TEXT / "encoder.json", TEXT / "vocab.bpe", CAPTIONS, DEMO_DECODER):
        if not path.is_file():
            raise SystemExit(f"{path}: missing; make the demo world first (dvc repro demo_gpt2)")
    tok = Tokenizer.from_files(TEXT / "encoder.json", TEXT / "vocab.bpe")
    captions = read_captions(CAPTIONS)
    random.Random(seed).shuffle(captions)
    ids = tok.encode_batch(captions[:batch_size * n_batches])
    return tok, [list(enumerate(ids[k:k + batch_size])) for k in range(0, len(ids), batch_size)]


def timed(run, batches):
    """Milliseconds per step of `run(batch)` over `batches`."""
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    return 1000 * (time.perf_counter() - start) / len(batches)


def captioner_settings(decoder, tok, table, parts, batch_size):
    """{label: a function timing a list of batches} for the captioner at each parts."""
    model = build_variant(decoder, "gated_cross:lora", DEMO_TOKENS[1], DEMO_TOKENS[0], perturb=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def setting(p):
        config = TrainConfig(batch_size=batch_size, speed=SpeedConfig(length_parts=p))

        def run(batches):
            model.load_state_dict(start)
            with training_steps(model, table, tok, config, "cpu") as step:
                return timed(lambda b: step(b, config.lr).item(), batches)
        return run
    return {f"parts {p}": setting(p) for p in parts}


def lm_settings(tok, parts, threads):
    """{label: a function timing a list of batches} for demo_gpt2's step at each threads x parts."""
    cfg = LMConfig()
    torch.manual_seed(0)
    model = GPT2(cfg.model_config(tok.vocab_size))
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def setting(p, t):
        def run(batches):
            torch.set_num_threads(t)
            model.load_state_dict(start)
            optimizer = make_optimizer(model, replace(cfg, length_parts=p))

            def step(batch):
                loss, _ = lm_loss(model, [ids for _, ids in batch], tok.eot_id, cfg.block_size, p)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
            return timed(step, batches)
        return run
    return {f"{t} thread{'s' * (t > 1)}, parts {p}": setting(p, t) for t in threads for p in parts}


def compare(name, settings, batches, warmup, rounds, log=print):
    """Rounds over `settings` (interleaved); one line per setting. Returns {label: [ms per round]}."""
    ms = {label: [] for label in settings}
    for run in settings.values():
        run(batches[:warmup])
    for _ in range(rounds):
        for label, run in settings.items():
            ms[label].append(run(batches))
    first = next(iter(ms.values()))
    for label, values in ms.items():
        ratio = [a / b for a, b in zip(first, values)]
        log(f"{name:<10} {label:<22} {statistics.median(values):7.1f} ms/step "
            f"[{min(values):.1f} - {max(values):.1f}]   {statistics.median(ratio):.2f}x "
            f"[{min(ratio):.2f} - {max(ratio):.2f}]")
    return ms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=2, help="torch threads for the captioner")
    p.add_argument("--lm-threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    tok, batches = demo_batches(args.batch_size, args.steps)
    widths = [max(len(ids) for _, ids in b) + 2 for b in batches]
    mean = statistics.mean(len(ids) + 2 for b in batches for _, ids in b)
    print(f"{len(batches)} batches of {args.batch_size} demo captions: {mean:.1f} positions per "
          f"caption, padded to {statistics.mean(widths):.1f} per batch; {args.rounds} interleaved "
          f"rounds, {args.warmup} warm-up steps; ms/step median [min - max], speed-up against "
          "the first setting in each round")
    torch.set_num_threads(args.threads)
    decoder, source = demo_decoder()
    table = torch.randn(args.batch_size, *DEMO_TOKENS)
    compare("captioner", captioner_settings(decoder, tok, table, args.parts, args.batch_size),
            batches, args.warmup, args.rounds)
    compare("demo_gpt2", lm_settings(tok, args.parts, args.lm_threads), batches, args.warmup,
            args.rounds)


if __name__ == "__main__":
    main()
