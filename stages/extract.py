"""DVC stage `extract`: frozen-encoder tokens of every split into features/<split>.h5, and the
scoring CLIP's image embeddings into features/clipscore_<split>.h5.

Reads params `world` (data_root; clip, the scoring CLIP) and `extract` (ExtractConfig).

Several processes: `torchrun --nproc-per-node N -m stages.extract`, or `extract.nproc_per_node: N`
(the stage re-runs itself so): each rank encodes its blocks of `extract.batch_size` images (the
batches one process makes), rank 0 writes every file once, atomically, with the same bytes as one
process on the same kind of device.
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import distributed
from common.atomic import remove_outputs
from common.device import resolve_device
from common.errors import run_stage
from common.imageio import list_images
from common.params import from_section, load_params
from evaluation.clip_io import load_clip
from evaluation.encoders import EncoderConfig, build_encoder, encoder_id
from evaluation.features import write_clip_embeddings, write_features
from stages.world import World

OUT = Path("features")


@dataclass
class ExtractConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # split -> image folder under world.data_root
    splits: dict = field(default_factory=lambda: {
        "train": "p2_data/images/train", "val": "p2_data/images/val", "p3": "p3_data/images"})
    clipscore_splits: list = field(default_factory=lambda: ["val"])  # world.clip's embeddings
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    skip_unreadable: bool = False  # leave unreadable images out (a line each) instead of stopping
    nproc_per_node: int = 1  # above 1: the stage re-runs itself under torchrun (README: Scale-out)

    def __post_init__(self):
        bad = [s for s in self.clipscore_splits if s not in self.splits]
        if bad:
            raise ValueError(f"extract.clipscore_splits {bad}: not in extract.splits "
                             f"({sorted(self.splits)})")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"extract.batch_size={self.batch_size} must be >= 1 and "
                             f"extract.num_workers={self.num_workers} >= 0")
        if self.nproc_per_node < 1:
            raise ValueError(f"extract.nproc_per_node={self.nproc_per_node}: must be at least 1")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--device", default=None, help="override extract.device")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    world = from_section(World, params.get("world"), f"{args.params}: world")
    p = from_section(ExtractConfig, params.get("extract"), f"{args.params}: extract")
    device_setting = args.device or p.device
    what = "--device" if args.device else f"{args.params}: extract.device"
    if p.nproc_per_node > 1 and not distributed.launched():
        resolve_device(device_setting, what)
        distributed.relaunch("stages.extract", ["--params", args.params]
                             + (["--device", args.device] if args.device else []),
                             p.nproc_per_node, device_setting,
                             f"{args.params}: extract.nproc_per_node")
        return
    with distributed.joined(device_setting, "extract") as ranks:
        run(world, p, resolve_device(device_setting, what) if ranks is None else str(ranks.device),
            ranks)


def run(world, p, device, ranks=None):
    """Extract every split on `device`: as the one process, or as a rank under torchrun."""
    main = ranks is None or ranks.is_main
    common = dict(batch_size=p.batch_size, num_workers=p.num_workers, device=device,
                  skip_unreadable=p.skip_unreadable, ranks=ranks)
    log = sys.stderr if main else open(os.devnull, "w")

    images = {split: list_images(Path(world.data_root) / folder, stream=log)
              for split, folder in p.splits.items()}
    eid = encoder_id(p.encoder)
    encoder = build_encoder(p.encoder, device=device)
    print(f"encoder {eid}: {encoder.num_tokens} tokens x {encoder.width}, grid {encoder.grid}, "
          f"device {device}" + (f", {ranks.world_size} processes" if ranks else ""), file=log)
    if p.clipscore_splits:
        model, preprocess = load_clip(world.clip, device=device)
    if ranks is not None:
        ranks.barrier()   # every rank has checked its inputs: only now may outputs go
    # inputs checked: a run killed from here on must not leave the previous run's files behind
    if main:
        remove_outputs(*[OUT / f"{split}.h5" for split in p.splits],
                       *[OUT / f"clipscore_{split}.h5" for split in p.clipscore_splits])
    for split, paths in images.items():
        t0 = time.perf_counter()
        skipped = write_features(OUT / f"{split}.h5", encoder, paths, eid, desc=split, **common)
        dt = time.perf_counter() - t0
        print(f"{split}: {len(paths) - len(skipped)} images ({len(skipped)} skipped) -> "
              f"{OUT / f'{split}.h5'} in {dt:.1f} s ({len(paths) / dt:.1f} img/s)", file=log)
    del encoder

    if p.clipscore_splits:
        mid = encoder_id(EncoderConfig(kind="clip", name=world.clip))
        for split in p.clipscore_splits:
            out = OUT / f"clipscore_{split}.h5"
            write_clip_embeddings(out, model, preprocess, images[split], mid,
                                  desc=f"clipscore {split}", **common)
            print(f"clipscore {split}: {out}", file=log)


if __name__ == "__main__":
    run_stage(main)
