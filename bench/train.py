"""Training throughput (captions/s) on cached features against the students' way (decode the
JPEG and run the frozen encoder at every step), at the demo size and the real size
(ViT-L/14 + GPT-2 small, random weights), all measured side by side in one run.

    python -m bench.train                                   # ~3-4 minutes on 2 CPU cores
    python -m bench.train --sizes real --device cuda --batch-size 64 --steps 20 \\
        --variants gated_cross:lora gated_cross:adapter gated_cross:prefix_tuning
    python -m bench.train --sizes real --batches random "by image"   # train.group_by_image

Flow per size: a handful of real JPEG files are written to a temp folder; the extract stage's
code (`evaluation.features.write_features`) encodes them into an HDF5 feature file; then every
variant trains with `training.loop.train_step` as train() takes it (AdamW, clipping, autocast bf16
on GPU, the speed switches of train.speed as the pipeline sets them; bench.common.training_steps)
fed from four sources of image tokens:
  h5 in RAM     the whole file read into memory once (what stages/train.py does; train.speed
                moves it to the GPU when it fits)
  h5 rows       rows read from the HDF5 file every step (FeatureFile.read_rows)
  workers       the best way without a feature cache: the JPEGs decoded and preprocessed by
                --workers DataLoader processes ahead of the step (as the extract stage reads
                them), the frozen encoder run every step under autocast (bf16 on a GPU)
  encode/step   the students' way: each image's JPEG decoded in the main process and run through
                the frozen encoder every step (autocast as above)
Rounds are interleaved (every source once per round); the table gives the median over rounds
and the range [min - max] of captions/s and of the ratio to encode/step within each round.
Batches are (image, caption) pairs (bench.common.caption_batches), composed as `--batches` says:
"random", the images of a batch distinct as in an epoch over captions in random order, and/or
"by image", each image's 5 captions together (train.group_by_image), so that a step reads each
image and computes its keys/values once for them.
"""
import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import flops
from bench.common import (COURSE_IMAGE, DEMO_IMAGE, IdTokenizer, Stopwatch, add_batches_arg,
                          add_device_args, batches_by_kind, build_variant, captions_per_image,
                          demo_decoder, demo_encoder, mean_text_len, real_decoder,
                          real_encoder, sync, training_steps, use_device, write_jpegs)
from evaluation.features import FeatureFile, write_features
from common.imageio import load_rgb
from training.loop import TrainConfig

SOURCES = ("h5 in RAM", "h5 rows", "workers", "encode/step")


class H5Rows:
    """`self(rows)`: the rows read from the HDF5 file at every step, copied to the device."""

    def __init__(self, feature_file, device):
        self.file, self.device = feature_file, device

    def __call__(self, rows):
        return self.file.read_rows(rows.tolist()).to(self.device, non_blocking=True)


class EncodeEveryStep:
    """`self(rows)`: the students' way: decode each row's JPEG, preprocess, run the frozen
    encoder (no grad; autocast bf16 on GPU, as the captioner). Times both parts."""

    def __init__(self, paths, encoder, device):
        self.paths, self.encoder, self.device = paths, encoder, torch.device(device)
        self.decode = Stopwatch("cpu")
        self.encode = Stopwatch(device)
        self.images = 0

    def __call__(self, rows):
        with self.decode:
            pixels = torch.stack([self.encoder.preprocess(load_rgb(self.paths[r]))
                                  for r in rows.tolist()])
        with self.encode, torch.no_grad(), torch.autocast(
                device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.encoder(pixels.to(self.device))
        self.images += len(rows)
        return out


class _BatchImages(torch.utils.data.Dataset):
    """Item k: the preprocessed pixels of the k-th batch's rows (decoded in a worker)."""

    def __init__(self, paths, preprocess, batches):
        self.paths, self.preprocess, self.batches = paths, preprocess, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return torch.stack([self.preprocess(load_rgb(self.paths[r])) for r in self.batches[k]])


class EncodeWithWorkers:
    """`self(rows)`: the images of `rows` decoded ahead by DataLoader workers, then the frozen
    encoder on the device. `start(order)` (untimed) starts the workers on the rows of the batches
    to come, in the order they will be asked for."""

    def __init__(self, paths, encoder, device, workers):
        self.paths, self.encoder, self.device = paths, encoder, torch.device(device)
        self.workers, self.pending = workers, None

    def start(self, order):
        self.order = [r.tolist() for r in order]
        loader = torch.utils.data.DataLoader(
            _BatchImages(self.paths, self.encoder.preprocess, self.order), batch_size=None,
            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        self.pending, self.next = iter(loader), 0

    def __call__(self, rows):
        if self.pending is None or self.order[self.next] != rows.tolist():
            raise RuntimeError("EncodeWithWorkers: rows asked for out of the order start() gave")
        pixels = next(self.pending)
        self.next += 1
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                             enabled=self.device.type == "cuda"):
            return self.encoder(pixels.to(self.device, non_blocking=True))


@dataclass
class Result:
    size: str
    variant: str
    source: str
    batches: str
    captions_per_s: float
    step_s: float
    train_flop: float = 0.0        # per caption, analytic
    encoder_flop: float = 0.0      # per image, analytic (encode/step only)
    decode_ms: float = 0.0         # per image (encode/step only)
    encode_ms: float = 0.0


def prepare(size, tmp, device, n_images, log=print):
    """(encoder, encoder_id, paths, FeatureFile, description) for one size."""
    make_encoder = demo_encoder if size == "demo" else real_encoder
    encoder, eid, source = make_encoder(tmp, device=device)
    paths = write_jpegs(Path(tmp) / f"{size}_images", n_images,
                        DEMO_IMAGE if size == "demo" else COURSE_IMAGE)
    h5 = Path(tmp) / f"{size}.h5"
    with Stopwatch(device) as sw:
        write_features(h5, encoder, paths, eid, batch_size=min(32, n_images), device=device,
                       desc=f"extract {size}")
    log(f"{size}: encoder {source}: {encoder.num_tokens} tokens x {encoder.width}; extracted "
        f"{n_images} JPEGs in {sw.seconds:.2f} s ({n_images / sw.seconds:.1f} img/s, fp32)")
    return encoder, eid, paths, FeatureFile(h5)


def time_source(step, rows, batches, config, device, warmup):
    """Seconds per step over `batches` after `warmup` untimed steps (on the last batches), the
    image tokens read by `rows` (None: the run's own table, as train() reads it)."""
    if hasattr(rows, "start"):   # DataLoader workers: started (forked) before the clock
        rows.start([torch.tensor(list(dict.fromkeys(i for i, _ in b)))
                    for b in batches[len(batches) - warmup:] + batches])
    for batch in batches[len(batches) - warmup:]:
        step(batch, config.lr, rows)
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        loss = step(batch, config.lr, rows)
    loss.item()   # waits for the device
    return (time.perf_counter() - start) / len(batches)


def bench_size(size, args, device, tmp, log=print):
    batch_size = args.batch_size or (32 if size == "demo" else 4)
    # A batch's captions have distinct images, as in an epoch (bench.common.caption_batches).
    encoder, eid, paths, features = prepare(size, tmp, device, max(args.images, batch_size), log)
    decoder, source = demo_decoder() if size == "demo" else real_decoder()
    log(f"{size}: decoder {source}")
    vocab, eot = decoder.config.vocab_size, decoder.config.vocab_size - 1
    composed = batches_by_kind(args.batches, len(paths), args.steps, batch_size, vocab)

    in_ram = FeatureFile(features.path, in_memory=True).read_rows(range(len(features)))
    on_the_fly = EncodeEveryStep(paths, encoder, device)
    sources = {"h5 in RAM": None, "h5 rows": H5Rows(features, device),
               "workers": EncodeWithWorkers(paths, encoder, device, args.workers),
               "encode/step": on_the_fly}
    runs = [(name, kind) for name in SOURCES for kind in args.batches]
    enc_flop = flops.encoder_forward(encoder)
    config = TrainConfig(batch_size=batch_size)
    tok = IdTokenizer(eot)
    results = []
    for variant in args.variants:
        model = build_variant(decoder, variant, features.width, features.num_tokens)
        shape = flops.CaptionerShape.of(model)
        rounds = {run: [] for run in runs}
        with training_steps(model, in_ram, tok, config, device) as step:
            for round_ in range(args.rounds):   # runs interleaved, every one once per round
                for name, kind in runs:
                    on_the_fly.decode.seconds = on_the_fly.encode.seconds = on_the_fly.images = 0
                    step_s = time_source(step, sources[name], composed[kind], config, device,
                                         args.warmup if round_ == 0 else 0)
                    r = Result(size, variant, name, kind, batch_size / step_s, step_s,
                               shape.train_per_caption(round(mean_text_len(composed[kind])),
                                                       captions_per_image(composed[kind])))
                    if name == "encode/step":
                        n = on_the_fly.images
                        r.encoder_flop = enc_flop
                        r.decode_ms = 1000 * on_the_fly.decode.seconds / n
                        r.encode_ms = 1000 * on_the_fly.encode.seconds / n
                    rounds[name, kind].append(r)
        for name, kind in runs:
            results.append(rounds[name, kind])
            rates = [r.captions_per_s for r in rounds[name, kind]]
            log(f"  {size} {variant} {name}, {kind} batches: {statistics.median(rates):.2f} "
                f"captions/s [{min(rates):.2f} - {max(rates):.2f}]")
        del model, step
    features.close()
    return results


def spread(values, fmt):
    """median [min - max]"""
    return (f"{format(statistics.median(values), fmt)} "
            f"[{format(min(values), fmt)} - {format(max(values), fmt)}]")


def table(results):
    """One line per source: captions/s and the ratio to encode/step on the same batches in the
    same round, each as median [min - max] over the rounds. `results`: a list of rounds (lists of
    Result) per (size, variant, source, batches)."""
    lines = [f"{'size':<5} {'variant':<22} {'image tokens from':<17} {'batches':<8} "
             f"{'captions/s':>26} {'vs encode/step':>26} {'JPEG ms/img':>12} {'encoder ms/img':>15}"]
    for rounds in results:
        r = rounds[0]
        base = next(x for x in results if x[0].size == r.size and x[0].variant == r.variant
                    and x[0].batches == r.batches and x[0].source == "encode/step")
        ratios = [a.captions_per_s / b.captions_per_s for a, b in zip(rounds, base)]
        extra = ""
        if r.source == "encode/step":
            extra = (f"{statistics.median(x.decode_ms for x in rounds):>12.1f} "
                     f"{statistics.median(x.encode_ms for x in rounds):>15.1f}")
        lines.append(f"{r.size:<5} {r.variant:<22} {r.source:<17} {r.batches:<8} "
                     f"{spread([x.captions_per_s for x in rounds], '.1f'):>26} "
                     f"{spread(ratios, '.2f') + 'x':>26} {extra}")
    return "\n".join(lines)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["demo", "real"], choices=["demo", "real"])
    p.add_argument("--variants", nargs="+", default=["gated_cross:lora"],
                   help="BRIDGE:PEFT, e.g. gated_cross:lora visual_prefix:none cross:adapter")
    p.add_argument("--images", type=int, default=8,
                   help="JPEG files written (and extracted); at least one batch's worth")
    p.add_argument("--batch-size", type=int, default=0, help="captions per step (0: demo 32, real 4)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per source")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per source, first round")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds over the sources (median and range reported)")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader processes decoding JPEGs for the 'workers' source")
    add_batches_arg(p)
    add_device_args(p)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    device = use_device(args)
    print(f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
          f"{args.threads} CPU threads, {args.steps} timed steps per source and round, "
          f"{args.rounds} interleaved rounds (median [min - max]), {args.warmup} warm-up steps, "
          f"{args.workers} JPEG-decoding workers for 'workers'")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for size in args.sizes:
            results += bench_size(size, args, device, tmp)
    print()
    print(table(results))
    return results


if __name__ == "__main__":
    main()
