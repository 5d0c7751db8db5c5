"""Real-size numbers on a GPU, in one run: ViT-L/14 feature extraction, training per PEFT
variant on cached features, beam-5 decoding, hw3_2-style captioning end to end; images or
captions per second, peak GPU memory, and the share of the GPU's peak FLOP rate (bench/flops.py).

    python -m bench.gpu --out results/          # needs CUDA; ~3-4 minutes on an H100
    python -m bench.gpu --device cpu --small    # the same code at toy sizes (a smoke test)

Random weights throughout (timm ViT-L/14 CLIP tower, GPT-2 small); the JPEGs are 640 x 480
files written to a temp folder (16 distinct pictures, the rest copies). Each row is measured as
the pipeline runs it now ("as is"); with --tuned also as it ran before the speed-ups ("before")
and, for decoding, with settings the stages do not use yet, so that a missed target names its cause.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from bench import flops
from bench.common import (Stopwatch, add_batches_arg, batches_by_kind, build_variant,
                          captions_per_image, fmt_rate, mean_text_len, peak_gib, peak_reset,
                          real_decoder, real_encoder, synthetic_tokenizer, write_jpegs)
from bench.train import IdTokenizer
from inference.caption_folder import caption_folder
from captioning.decoding import DecodeConfig, generate
from evaluation.features import FeatureFile, write_features
from common.imageio import list_images
from common.precision import StoredLinearWeights
from training.loop import TrainConfig, make_optimizer, train_step, training_steps

TRAIN_CAPTIONS = 10604 * 5      # one epoch of the course's train split
VAL_IMAGES = 1789
ALL_IMAGES = 12393              # train + val


def autocast(device, dtype):
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


class Report:
    def __init__(self, out, peak):
        self.rows, self.out, self.peak = [], out, peak

    def add(self, what, setting, unit, rate, flop_per_item, mem, note=""):
        row = dict(what=what, setting=setting, unit=unit, rate=rate,
                   tflops=rate * flop_per_item / 1e12, share=rate * flop_per_item / self.peak,
                   peak_gib=mem, note=note)
        self.rows.append(row)
        print(f"{what} [{setting}]: {fmt_rate(rate)} {unit}/s, {row['tflops']:.1f} TFLOP/s "
              f"({row['share']:.1%} of peak), peak {mem:.1f} GiB {note}", flush=True)
        if self.out:
            (self.out / "gpu_results.json").write_text(json.dumps(self.rows, indent=1))

    def table(self):
        lines = ["| measured | setting | rate | TFLOP/s | share of peak | peak GPU memory | note |",
                 "|---|---|---:|---:|---:|---:|---|"]
        for r in self.rows:
            lines.append(f"| {r['what']} | {r['setting']} | {fmt_rate(r['rate'])} {r['unit']}/s | "
                         f"{r['tflops']:.1f} | {r['share']:.1%} | {r['peak_gib']:.1f} GiB | {r['note']} |")
        return "\n".join(lines)


def bench_encoder(encoder, device, report, batch, reps):
    per_image = flops.encoder_forward(encoder)
    pixels = torch.randn(batch, 3, *encoder.image_size, device=device)
    for name, dtype in (("fp32 (as the extract stage runs it)", None), ("autocast fp16", torch.float16)):
        peak_reset(device)
        with torch.inference_mode(), autocast(device, dtype):
            encoder(pixels)
            with Stopwatch(device) as sw:
                for _ in range(reps):
                    encoder(pixels)
        rate = batch * reps / sw.seconds
        report.add("ViT-L/14 encoder only (tensors on GPU)", f"{name}, batch {batch}", "img", rate,
                   per_image, peak_gib(device),
                   f"{ALL_IMAGES} images: {ALL_IMAGES / rate:.1f} s")


def bench_extract(encoder, eid, paths, device, report, tmp, settings):
    per_image = flops.encoder_forward(encoder)
    out = None
    for name, dtype, batch, workers in settings:
        out = Path(tmp) / f"extract_{workers}_{batch}.h5"
        peak_reset(device)
        with autocast(device, dtype), Stopwatch(device) as sw:
            write_features(out, encoder, paths, eid, batch_size=batch, num_workers=workers,
                           device=device, desc=f"extract {name}")
        rate = len(paths) / sw.seconds
        report.add(f"extraction, {len(paths)} JPEGs 640x480 -> HDF5 (write_features)",
                   f"{name}, batch {batch}, {workers} loader workers", "img", rate, per_image,
                   peak_gib(device), f"{ALL_IMAGES} images: {ALL_IMAGES / rate:.0f} s")
    return out


TRAIN_SETTINGS = {
    "before": "foreach AdamW, fp32 frozen weights, features on the host (the first train stage)",
    "frozen stored": "fused AdamW, frozen Linear weights stored bf16, trainable ones cast by "
                     "autocast at every use, features on the GPU (2026-11-23 to 11-26)",
    "as is": "as training.loop.train runs it (fused AdamW, Linear weights stored bf16 with fp32 "
             "masters for the trainable ones, features on the GPU)",
}


def steps_as(setting, model, tokens, tok, config, device):
    """Inside: step(batch, lr), one training step as `setting` takes it."""
    if setting != "before":
        return training_steps(model, tokens, tok, config, device,
                              store_trainable=setting == "as is")
    model.to(device).train()
    optimizer, params = make_optimizer(model, config, fused=False)
    return contextlib.nullcontext(lambda b, lr: train_step(model, optimizer, params, b, tokens, tok,
                                                           config, device, lr))


def bench_training(features, decoder, variants, device, report, batch, steps, warmup,
                   profile_dir=None, settings=("as is",), rounds=1, kinds=("random",)):
    """Every setting x kind of batches (bench.common.BATCHES) for every variant."""
    tokens = FeatureFile(features, in_memory=True).read_rows(range(len(FeatureFile(features))))
    vocab = decoder.config.vocab_size
    tok = IdTokenizer()
    tok.eot_id = vocab - 1
    composed = batches_by_kind(kinds, len(tokens), steps + warmup, batch, vocab)
    runs = [(setting, kind) for setting in settings for kind in kinds]
    for variant in variants:
        best, per_caption = {}, {}
        for _ in range(rounds):   # runs interleaved, the best round of each kept
            for setting, kind in runs:
                batches = composed[kind]
                config = TrainConfig(batch_size=batch, group_by_image=kind == "by image")
                model = build_variant(decoder, variant, tokens.shape[2], tokens.shape[1])
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                per_caption[setting, kind] = flops.CaptionerShape.of(model).train_per_caption(
                    round(mean_text_len(batches)), captions_per_image(batches))
                peak_reset(device)
                with steps_as(setting, model, tokens, tok, config, device) as step:
                    for b in batches[:warmup]:
                        step(b, config.lr).item()
                    with Stopwatch(device) as sw:
                        for b in batches[warmup:]:
                            step(b, config.lr).item()
                    if (setting, kind) not in best or sw.seconds < best[setting, kind][0]:
                        best[setting, kind] = (sw.seconds, peak_gib(device))
                    if profile_dir is not None and variant == variants[0]:
                        # a name the device tool brings back: no spaces or commas
                        name = re.sub(r"[^\w.-]+", "_", f"{setting}_{kind}")
                        profile_training(step, batches[:6], config, device,
                                         profile_dir / f"profile_train_{name}.txt")
                del model, step
        for setting, kind in runs:
            seconds, mem = best[setting, kind]
            rate = batch * steps / seconds
            report.add(f"training {variant} ({trainable / 1e6:.1f}M trainable), cached features",
                       f"{TRAIN_SETTINGS[setting]}, {kind} batches, autocast bf16, batch {batch}",
                       "caption", rate, per_caption[setting, kind], mem,
                       f"epoch of {TRAIN_CAPTIONS} captions: {TRAIN_CAPTIONS / rate:.0f} s")
        profile_dir = None


def profile_training(step, batches, config, device, path):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for b in batches:
            step(b, config.lr).item()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = (prof.key_averages().table(sort_by=key, row_limit=25) + "\n\n"
            + prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    path.write_text(text)
    print(text[:4000])


def bench_beam(features, decoder, device, report, batch, steps, beam, tuned=False):
    tokens = FeatureFile(features, in_memory=True).read_rows(range(batch))
    model = build_variant(decoder, "gated_cross:lora", tokens.shape[2], tokens.shape[1],
                          perturb=True).to(device).eval()
    per_image = flops.CaptionerShape.of(model).decode_per_image(steps, beam)
    cfg = DecodeConfig(method="beam", beam_size=beam, max_new_tokens=steps, min_new_tokens=steps)
    visual = tokens.to(device)
    settings = [("fp32 (as decode/hw3_2 run it)", None), ("autocast bf16", torch.bfloat16)]
    if tuned and device.type == "cuda":
        settings.append(("autocast bf16, frozen Linear weights stored bf16", torch.bfloat16))
    for name, dtype in settings:
        stored = torch.bfloat16 if "stored bf16" in name else None
        peak_reset(device)
        with autocast(device, dtype), StoredLinearWeights(model, stored, trainable=False):
            generate(model, visual[:2], cfg, decoder.config.vocab_size - 1)
            with Stopwatch(device) as sw:
                generate(model, visual, cfg, decoder.config.vocab_size - 1)
        rate = batch / sw.seconds
        report.add(f"beam {beam} decoding, {steps} tokens, gated_cross:lora, cached features",
                   f"{name}, {batch} images per batch", "caption", rate, per_image,
                   peak_gib(device), f"{VAL_IMAGES} images: {VAL_IMAGES / rate:.1f} s")
    del model


def bench_end_to_end(img_dir, n_images, encoder, decoder, tokenizer, device, report, settings,
                     steps, beam):
    model = build_variant(decoder, "gated_cross:lora", encoder.width, encoder.num_tokens,
                          perturb=True).to(device).eval()
    per_image = (flops.encoder_forward(encoder)
                 + flops.CaptionerShape.of(model).decode_per_image(steps, beam))
    cfg = DecodeConfig(method="beam", beam_size=beam, max_new_tokens=steps, min_new_tokens=steps)
    for name, dtype, batch, workers in settings:
        peak_reset(device)
        with autocast(device, dtype), Stopwatch(device) as sw:
            captions, skipped = caption_folder(list_images(img_dir), encoder, model, tokenizer,
                                               dataclasses.replace(cfg, batch_size=batch),
                                               num_workers=workers, device=device)
        assert len(captions) == n_images and not skipped and all(captions.values())
        rate = n_images / sw.seconds
        report.add(f"hw3_2-style end to end (caption_folder: JPEG -> ViT-L/14 -> beam {beam}, "
                   f"{steps} tokens)", f"{name}, batch {batch}, {workers} loader workers", "img",
                   rate, per_image, peak_gib(device),
                   f"{VAL_IMAGES} images: {VAL_IMAGES / rate:.1f} s")
    del model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_results.json")
    p.add_argument("--small", action="store_true", help="toy sizes: a smoke test of this script")
    p.add_argument("--variants", nargs="+", default=[
        "gated_cross:lora", "gated_cross:adapter", "gated_cross:prefix_tuning", "gated_cross:prompt_tuning",
        "gated_cross:adaption_prompt", "visual_prefix:lora"])
    p.add_argument("--images", type=int, default=VAL_IMAGES, help="JPEGs for extraction and hw3_2")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--decode-tokens", type=int, default=20)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--decode-batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--tuned", action="store_true",
                   help="also measure training before the speed-ups, decoding with bf16-stored weights")
    p.add_argument("--train-settings", nargs="+", choices=list(TRAIN_SETTINGS), default=None,
                   help="training: the settings to compare (default: as is; --tuned: before, as is)")
    p.add_argument("--rounds", type=int, default=1, help="training: rounds over settings, best kept")
    add_batches_arg(p)
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["encoder", "extract", "train", "profile", "beam", "e2e"],
                   help="parts to leave out (extraction with autocast fp16 always runs)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    report = Report(out, flops.H100_BF16_DENSE)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        if args.small:   # toy sizes, same code
            from bench.common import demo_decoder, demo_encoder
            encoder, eid, _ = demo_encoder(tmp, device=device)
            decoder, _ = demo_decoder()
            tokenizer = synthetic_tokenizer(decoder.config.vocab_size)
            n, enc_batch, reps = min(args.images, 24), 8, 1
            args.train_batch = min(args.train_batch, n)   # a batch's images are distinct
        else:
            encoder, eid, _ = real_encoder(tmp, device=device)
            decoder, _ = real_decoder()
            tokenizer = synthetic_tokenizer()
            n, enc_batch, reps = args.images, 256, 5
        print(f"models built in {time.time() - start:.0f} s", flush=True)
        paths = write_jpegs(Path(tmp) / "images", n)
        if "encoder" not in args.skip:
            bench_encoder(encoder, device, report, enc_batch, reps)
        # Always extracted (training and beam search read these features); the as-is row optional.
        settings = [("autocast fp16", torch.float16, 256, args.workers)]
        if "extract" not in args.skip:
            settings.insert(0, ("fp32 (as the extract stage runs it)", None, 64, 0))
        features = bench_extract(encoder, eid, paths, device, report, tmp, settings)
        if "train" not in args.skip:
            settings = args.train_settings or (
                ("before", "as is") if args.tuned and device.type == "cuda" else ("as is",))
            bench_training(features, decoder, args.variants, device, report, args.train_batch,
                           args.train_steps, 3, out if "profile" not in args.skip else None,
                           settings, args.rounds, args.batches)
        if "beam" not in args.skip:
            bench_beam(features, decoder, device, report, min(args.decode_batch, n),
                       args.decode_tokens, args.beam, args.tuned)
        if "e2e" not in args.skip:
            bench_end_to_end(paths[0].parent, n, encoder, decoder, tokenizer, device, report,
                             [("fp32 (as hw3_2.py ran it before its loader workers and fp16 "
                               "encoder)", None, 32, 0),
                              ("autocast bf16", torch.bfloat16, 128, args.workers)],
                             args.decode_tokens, args.beam)
    print(f"\nall done in {time.time() - start:.0f} s; peak = {flops.H100_BF16_DENSE / 1e12:.0f} "
          f"TFLOP/s (H100 SXM dense bf16)\n")
    print(report.table())
    if out:
        (out / "gpu_table.md").write_text(report.table() + "\n")


if __name__ == "__main__":
    main()
