"""Is the feature loader ever the bottleneck? HDF5 rows/s through a DataLoader with 0, 1, 2, 4
workers (shuffled batches, `FeatureFile.read_rows`), the in-RAM copy stages/train.py uses, and
what one training step consumes (captions/s of `training.loop.train_step` on the same rows),
at the demo row size (65 x 128 fp16) and the real one (257 x 1024 fp16), in one run.

    python -m bench.loader                       # ~2 minutes on 2 CPU cores
    python -m bench.loader --device cuda --batch-size 64 --real-rows 4096 --workers 0 1 2 4 8

The feature files are synthetic (random fp16 rows in the extract stage's layout, in a temp
folder). They were just written, so they sit in the page cache: these are warm-cache rates; a
cold first epoch also waits on the disk.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from bench.common import (IdTokenizer, add_device_args, build_variant, caption_batches,
                          demo_decoder, fmt_rate, real_decoder, sync, training_steps, use_device)
from evaluation.features import FORMAT_VERSION, LIBVER, FeatureFile
from speed import gather_rows
from training.loop import TrainConfig

SIZES = {"demo": (65, 128, (8, 8), 64), "real": (257, 1024, (16, 16), 224)}   # T, D, grid, px


def synthetic_feature_file(path, rows, tokens, width, grid, image_size, seed=0):
    """A features/<split>.h5 of random rows, laid out as evaluation.features.write_features does."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w", libver=LIBVER) as f:
        ds = f.create_dataset("tokens", shape=(rows, tokens, width), dtype=np.float16,
                              chunks=(1, tokens, width), track_times=False)
        block = max(1, (64 << 20) // (tokens * width * 2))
        for start in range(0, rows, block):
            n = min(block, rows - start)
            ds[start:start + n] = rng.standard_normal((n, tokens, width), dtype=np.float32)
        f.create_dataset("names", data=np.array([f"img_{i:06d}" for i in range(rows)], dtype=object),
                         dtype=h5py.string_dtype("utf-8"), track_times=False)
        f.attrs.update(format_version=FORMAT_VERSION, encoder_id="synthetic", num_tokens=tokens,
                       num_prefix_tokens=1, width=width, grid=np.array(grid),
                       image_size=np.array([image_size, image_size]))
    return path


class RowBatches(Dataset):
    """Item = a list of row indices -> those rows (one read_rows call per batch)."""

    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, rows):
        return self.features.read_rows(rows)


def loader_rate(features, batch_size, workers, seconds, seed=0):
    """Rows/s of shuffled batches through a DataLoader, over about `seconds` (after its start)."""
    sampler = BatchSampler(RandomSampler(range(len(features)),
                                         generator=torch.Generator().manual_seed(seed)),
                           batch_size, drop_last=True)
    loader = DataLoader(RowBatches(features), sampler=sampler, batch_size=None,
                        num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)   # workers started, first batch in
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            n += len(next(it))
        except StopIteration:   # a new epoch: its restart is part of the rate
            it = iter(loader)
    rate = n / (time.perf_counter() - start)
    del it, loader
    return rate


def ram_rate(features, batch_size, seconds, gather, seed=0):
    """Rows/s of batches gathered from the in-RAM copy (stages/train.py's way) by `gather`."""
    ram = FeatureFile(features.path, in_memory=True).read_rows(range(len(features)))
    g = torch.Generator().manual_seed(seed)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows = torch.randint(len(ram), (batch_size,), generator=g)
        n += len(gather(ram, rows))
    return n / (time.perf_counter() - start)


def train_rate(size, features, batch_size, steps, device):
    """Captions/s of training steps (gated_cross + LoRA) fed from the in-RAM rows, as train()
    takes them (bench.common.training_steps)."""
    decoder, _ = demo_decoder() if size == "demo" else real_decoder()
    model = build_variant(decoder, "gated_cross:lora", features.width, features.num_tokens)
    config = TrainConfig(batch_size=batch_size)
    ram = FeatureFile(features.path, in_memory=True).read_rows(range(len(features)))
    tok = IdTokenizer(decoder.config.vocab_size - 1)
    batches = caption_batches(len(ram), steps + 1, batch_size, decoder.config.vocab_size)
    with training_steps(model, ram, tok, config, device) as step:
        step(batches[0], config.lr).item()
        sync(device)
        start = time.perf_counter()
        for b in batches[1:]:
            loss = step(b, config.lr)
        loss.item()
    return batch_size * steps / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["demo", "real"], choices=list(SIZES))
    p.add_argument("--demo-rows", type=int, default=3000, help="rows in the demo-size file")
    p.add_argument("--real-rows", type=int, default=1024, help="rows in the real-size file")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--batch-size", type=int, default=0, help="0: demo 64, real 8")
    p.add_argument("--seconds", type=float, default=3.0, help="per loader measurement")
    p.add_argument("--train-steps", type=int, default=3)
    add_device_args(p)
    p.add_argument("--tmp", default=None, help="folder for the synthetic files (default: a temp dir)")
    args = p.parse_args(argv)
    device = use_device(args)
    print(f"device {device}, {args.threads} CPU threads, {os.cpu_count()} cores visible")
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="bench_loader_", dir=args.tmp) as tmp:
        for size in args.sizes:
            T, D, grid, px = SIZES[size]
            n = args.demo_rows if size == "demo" else args.real_rows
            batch = args.batch_size or (64 if size == "demo" else 8)
            if n < batch:
                p.error(f"--{size}-rows {n} is fewer than one batch of {batch}")
            path = synthetic_feature_file(Path(tmp) / f"{size}.h5", n, T, D, grid, px)
            features = FeatureFile(path)
            mb = n * T * D * 2 / 2**20
            print(f"{size}: {n} rows of {T} x {D} fp16 ({T * D * 2 / 1024:.0f} KiB/row, "
                  f"{mb:.0f} MiB), batches of {batch}", flush=True)
            consume = train_rate(size, features, batch, args.train_steps, device)
            print(f"  training consumes {consume:.1f} captions/s", flush=True)
            rates = [("in RAM, gather_rows (numpy_gather on)",
                      ram_rate(features, batch, args.seconds, gather_rows)),
                     ("in RAM, torch index (numpy_gather off)",
                      ram_rate(features, batch, args.seconds, lambda t, r: t[r]))]
            for w in args.workers:
                rates.append((f"HDF5, {w} workers", loader_rate(features, batch, w, args.seconds)))
                print(f"  {rates[-1][0]}: {rates[-1][1]:.0f} rows/s", flush=True)
            rows_out += [(size, name, r, consume, T * D * 2) for name, r in rates]
            features.close()
    print(f"\n{'size':<5} {'source':<40} {'rows/s':>10} {'MB/s':>8} {'training captions/s':>20} "
          f"{'loader / training':>18}")
    for size, name, r, consume, row_bytes in rows_out:
        print(f"{size:<5} {name:<40} {fmt_rate(r):>10} {r * row_bytes / 1e6:>8.0f} "
              f"{fmt_rate(consume):>20} {r / consume:>17.1f}x")
    return rows_out


if __name__ == "__main__":
    main()
