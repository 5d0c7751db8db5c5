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
fed from three sources of image tokens:
  h5 in RAM     the whole file read into memory once (what stages/train.py does; train.speed
                moves it to the GPU when it fits)
  h5 rows       rows read from the HDF5 file every step (FeatureFile.read_rows)
  encode/step   each image's JPEG decoded and run through the frozen encoder every step
Batches are (image, caption) pairs (bench.common.caption_batches), composed as `--batches` says:
"random", the images of a batch distinct as in an epoch over captions in random order, and/or
"by image", each image's 5 captions together (train.group_by_image), so that a step reads each
image and computes its keys/values once for them.
"""
import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import flops
from bench.common import (COURSE_IMAGE, DEMO_IMAGE, IdTokenizer, Stopwatch, add_batches_arg,
                          add_device_args, batches_by_kind, build_variant, captions_per_image,
                          demo_decoder, demo_encoder, fmt_rate, mean_text_len, real_decoder,
                          real_encoder, sync, training_steps, use_device, write_jpegs)
from evaluation.features import FeatureFile, write_features
from common.imageio import load_rgb
from training.loop import TrainConfig

SOURCES = ("h5 in RAM", "h5 rows", "encode/step")


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
    sources = {"h5 in RAM": None, "h5 rows": H5Rows(features, device), "encode/step": on_the_fly}
    runs = [(name, kind) for name in SOURCES for kind in args.batches]
    enc_flop = flops.encoder_forward(encoder)
    config = TrainConfig(batch_size=batch_size)
    tok = IdTokenizer(eot)
    results = []
    for variant in args.variants:
        model = build_variant(decoder, variant, features.width, features.num_tokens)
        shape = flops.CaptionerShape.of(model)
        best = {}
        with training_steps(model, in_ram, tok, config, device) as step:
            for round_ in range(args.rounds):   # runs interleaved; the best round of each kept
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
                    if (name, kind) not in best or r.step_s < best[name, kind].step_s:
                        best[name, kind] = r
        for name, kind in runs:
            r = best[name, kind]
            results.append(r)
            log(f"  {size} {variant} {name}, {kind} batches: {r.captions_per_s:.2f} captions/s "
                f"({r.step_s:.3f} s/step of {batch_size})")
        del model, step
    features.close()
    return results


def table(results):
    lines = [f"{'size':<5} {'variant':<22} {'image tokens from':<17} {'batches':<8} "
             f"{'captions/s':>11} {'s/step':>8} {'vs encode/step':>15} {'JPEG ms/img':>12} "
             f"{'encoder ms/img':>15}"]
    for r in results:   # against the students' way on the same batches
        base = next(x for x in results if x.size == r.size and x.variant == r.variant
                    and x.batches == r.batches and x.source == "encode/step")
        extra = (f"{r.decode_ms:>12.1f} {r.encode_ms:>15.1f}" if r.source == "encode/step"
                 else f"{'':>12} {'':>15}")
        lines.append(f"{r.size:<5} {r.variant:<22} {r.source:<17} {r.batches:<8} "
                     f"{fmt_rate(r.captions_per_s):>11} "
                     f"{r.step_s:>8.3f} {r.captions_per_s / base.captions_per_s:>14.1f}x {extra}")
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
    p.add_argument("--rounds", type=int, default=2, help="rounds over the sources; best kept")
    add_batches_arg(p)
    add_device_args(p)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    device = use_device(args)
    print(f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
          f"{args.threads} CPU threads, {args.steps} timed steps per source and round, "
          f"{args.rounds} rounds (best kept), {args.warmup} warm-up steps")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for size in args.sizes:
            results += bench_size(size, args, device, tmp)
    print()
    print(table(results))
    return results


if __name__ == "__main__":
    main()
