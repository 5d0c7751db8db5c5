"""Data-parallel training throughput: captions/s of one process against N processes under
torchrun (DistributedDataParallel, the global batch the same: train.batch_size captions per step
whatever N), as the train stage runs them, in rounds that alternate the process counts.

    python -m bench.ddp                         # demo size, CPU: 1 vs 2 processes (gloo), ~3 min
    python -m bench.ddp --size real --device cuda --nproc 1 8 --rounds 3   # every GPU (NCCL)

What a round runs is training.loop's own step (train_step inside the run's TrainingSpeedups, the
share and weight of `rank_share`, the loss in DDP by `data_parallel_loss`), fed as the stage feeds
it: one process reads the feature table into memory (train.speed moves it to the GPU when it
fits); a rank under torchrun reads its share's rows from the HDF5 file at every step (--one-from
file: the single process does too). Features and captions are synthetic: a feature file of random
rows in the extract stage's layout (demo: 65 x 128, real: 257 x 1024 fp16), random captions of
8-20 tokens, batches of distinct images (bench.common.caption_batches); decoder: the demo world's
GPT-2 if made (else a random one of its shape) or a random GPT-2 small.

On the CPU one process takes every core (torch threads = cores) and each of N processes
cores / N. Each round reports captions/s over --steps timed steps after --warmup steps (rank 0's
clock, between two barriers), and every rank's peak resident memory. Printed: per process count
the median and spread (min-max) over the rounds, and the ratio of the medians.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (IdTokenizer, build_variant, caption_batches, demo_decoder, fmt_rate,
                          real_decoder, sync)
from bench.loader import SIZES, synthetic_feature_file
from common import distributed
from evaluation.features import FeatureFile, FileRows
from training.loop import (TrainConfig, data_parallel_loss, make_optimizer, rank_share, speedups,
                           train_step)


def worker(args):
    """One round's process (or rank): time --steps training steps, write the result (rank 0)."""
    with distributed.joined(args.device, "bench.ddp") as ranks:
        nproc = ranks.world_size if ranks else 1
        device = ranks.device if ranks else torch.device(args.device)
        local = ranks.local_world_size if ranks else 1
        threads = args.threads or max(1, distributed.cpu_cores() // local)
        torch.set_num_threads(threads)
        decoder, decoder_name = (demo_decoder() if args.size == "demo" else real_decoder())
        tokens_per_image, width = SIZES[args.size][:2]
        model = build_variant(decoder, args.variant, width, tokens_per_image, perturb=True)
        features = FeatureFile(args.features, in_memory=ranks is None and args.one_from == "memory")
        table = features.all_rows() if features._ram is not None else FileRows(features)
        config = TrainConfig(batch_size=args.batch_size, lr=1e-4, warmup_steps=0)
        tokenizer = IdTokenizer(decoder.config.vocab_size - 1)
        batches = caption_batches(len(features), args.warmup + args.steps, args.batch_size,
                                  decoder.config.vocab_size)
        model.to(device).train()
        optimizer, params = make_optimizer(model, config)
        with speedups(model, table, config, device) as fast:
            parallel = data_parallel_loss(model, fast, ranks) if ranks else None

            def step(batch):
                if ranks is None:
                    return train_step(model, optimizer, params, batch, tokenizer, config, device,
                                      config.lr, fast)
                share, weight, _, _ = rank_share(batch, ranks, config.max_caption_tokens)
                return train_step(model, optimizer, params, share, tokenizer, config, device,
                                  config.lr, fast, parallel, weight)

            for batch in batches[:args.warmup]:
                step(batch)
            sync(device)
            if ranks:
                ranks.barrier()
            start = time.perf_counter()
            for batch in batches[args.warmup:]:
                loss = step(batch)
            loss.item()
            if ranks:
                ranks.barrier()
            seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10   # MiB (Linux: KiB)
        peaks = ranks.gather(peak) if ranks else [peak]
        if ranks is None or ranks.is_main:
            result = {"nproc": nproc, "captions_per_s": args.steps * args.batch_size / seconds,
                      "seconds": seconds, "threads_per_process": threads,
                      "device": str(device.type), "decoder": decoder_name,
                      "peak_rss_mib": peaks, "table_mib": features.shape[0] *
                      features.shape[1] * features.shape[2] * 2 / 2**20}
            Path(args.out).write_text(json.dumps(result))


def one_round(args, nproc, threads, features, out):
    command = [sys.executable, "-m", "bench.ddp", "--worker", "--features", str(features),
               "--out", str(out)] + [a for k in ("size", "device", "variant", "batch_size",
                                                 "steps", "warmup", "one_from")
                                    for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    if threads:
        command += ["--threads", str(threads)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(nproc)] + command[1:]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench.ddp: a round with {nproc} process(es) failed:\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(Path(out).read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="demo")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (one GPU per process)")
    ap.add_argument("--nproc", type=int, nargs="+", default=None,
                    help="process counts to compare (default: 1 and every core or GPU, at most "
                         "2 on the CPU)")
    ap.add_argument("--variant", default="gated_cross:lora")
    ap.add_argument("--batch-size", type=int, default=64, help="the global batch (captions)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=None,
                    help="rows of the synthetic feature file (default: 2048 demo, 512 real)")
    ap.add_argument("--one-from", choices=("memory", "file"), default="memory",
                    help="the single process's rows: the table in memory (the stage) or the file")
    ap.add_argument("--one-threads", type=int, nargs="+", default=None,
                    help="CPU: torch threads of the single process, one configuration each "
                         "(default: every core); e.g. 2 1 adds one process on one core")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--features", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    gpu = args.device.startswith("cuda")
    most = torch.cuda.device_count() if gpu else min(2, distributed.cpu_cores())
    counts = args.nproc or [1, most]
    for n in counts:
        distributed.check_nproc(n, args.device, "--nproc")
    # (processes, torch threads of the single process: None = the worker's default)
    configs = [(n, t) for n in counts
               for t in ((args.one_threads or [None]) if n == 1 and not gpu else [None])]
    tokens, width, grid, px = SIZES[args.size]
    images = args.images or (2048 if args.size == "demo" else 512)
    results = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        features = synthetic_feature_file(Path(tmp) / "train.h5", images, tokens, width, grid, px)
        print(f"bench.ddp: {args.size} size ({tokens} x {width} tokens, {images} images), "
              f"{args.variant}, global batch {args.batch_size}, {args.steps} timed steps after "
              f"{args.warmup}, {args.rounds} rounds of {counts} processes on {args.device}",
              file=sys.stderr)
        for r in range(args.rounds):
            for n, t in configs:
                result = one_round(args, n, t, features, Path(tmp) / f"r{r}-{n}-{t}.json")
                results[n, t].append(result)
                print(f"  round {r + 1}: {n} process(es) x {result['threads_per_process']} "
                      f"thread(s): {fmt_rate(result['captions_per_s'])} captions/s, peak RSS "
                      f"per process {', '.join(f'{m:.0f}' for m in result['peak_rss_mib'])} MiB",
                      file=sys.stderr)
    first = results[configs[0]][0]
    print(f"\n{args.size} size, {args.variant}, global batch {args.batch_size}, device "
          f"{args.device}, decoder {first['decoder']}, feature table {first['table_mib']:.0f} MiB, "
          f"{args.rounds} interleaved rounds of {args.steps} steps")
    print("| processes | threads each | captions/s (median) | min - max | vs the first row | "
          "peak RSS per process (MiB) |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(x["captions_per_s"] for x in results[configs[0]])
    for c in configs:
        rates = [x["captions_per_s"] for x in results[c]]
        med = statistics.median(rates)
        rss = max(m for x in results[c] for m in x["peak_rss_mib"])
        print(f"| {c[0]} | {results[c][0]['threads_per_process']} | {fmt_rate(med)} | "
              f"{fmt_rate(min(rates))} - {fmt_rate(max(rates))} | {med / base:.2f}x | "
              f"{rss:.0f} |")
    for c in configs[1:]:   # the ratio per round, against the first row: drift cancels
        pairs = [b["captions_per_s"] / a["captions_per_s"]
                 for a, b in zip(results[configs[0]], results[c])]
        print(f"ratio per round, {c[0]} x {results[c][0]['threads_per_process']} against "
              f"{configs[0][0]} x {first['threads_per_process']}: median "
              f"{statistics.median(pairs):.2f} (min {min(pairs):.2f}, max {max(pairs):.2f})")

if __name__ == "__main__":
    main()
