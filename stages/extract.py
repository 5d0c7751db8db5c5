"""DVC stage `extract`: frozen-encoder tokens of every split into features/<split>.h5, and the
scoring CLIP's image embeddings into features/clipscore_<split>.h5.

Reads `world.data_root`, `world.clip` (the scoring CLIP) and the `extract:` section, e.g.
    extract:
      encoder: {kind: clip, name: data/demo/clip_demo.pt}
      splits: {train: p2_data/images/train, val: p2_data/images/val, p3: p3_data/images}
      clipscore_splits: [val]
      batch_size: 64
      num_workers: 0
      device: auto
      skip_unreadable: false
      out_dir: features
"""
import argparse
import sys
import time
from pathlib import Path

from models.atomic import remove_outputs
from models.clip_io import load_clip
from models.config import load_params
from models.device import resolve_device
from models.encoders import EncoderConfig, build_encoder, encoder_id
from models.errors import run_stage
from models.features import write_clip_embeddings, write_features
from models.imageio import list_images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--device", default=None, help="override extract.device")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    p, world = params["extract"], params["world"]
    root, out_dir = Path(world["data_root"]), Path(p.get("out_dir", "features"))
    device = resolve_device(args.device or p.get("device", "auto"),
                            "--device" if args.device else f"{args.params}: extract.device")
    common = dict(batch_size=int(p.get("batch_size", 32)), num_workers=int(p.get("num_workers", 0)),
                  device=device, skip_unreadable=bool(p.get("skip_unreadable", False)))

    score_splits = p.get("clipscore_splits") or []
    for split in score_splits:   # checked before the long part starts
        if split not in p["splits"]:
            raise SystemExit(f"{args.params}: extract.clipscore_splits names {split!r}, "
                             f"which is not in extract.splits ({sorted(p['splits'])})")

    images = {split: list_images(root / folder, stream=sys.stderr)
              for split, folder in p["splits"].items()}
    cfg = EncoderConfig.from_dict(p["encoder"], f"{args.params}: extract.encoder")
    eid = encoder_id(cfg)
    encoder = build_encoder(cfg, device=device)
    print(f"encoder {eid}: {encoder.num_tokens} tokens x {encoder.width}, grid {encoder.grid}, "
          f"device {device}", file=sys.stderr)
    if score_splits:
        model, preprocess = load_clip(world["clip"], device=device)
    # inputs checked: a run killed from here on must not leave the previous run's files behind
    remove_outputs(*[out_dir / f"{split}.h5" for split in p["splits"]],
                   *[out_dir / f"clipscore_{split}.h5" for split in score_splits])
    for split, paths in images.items():
        t0 = time.perf_counter()
        skipped = write_features(out_dir / f"{split}.h5", encoder, paths, eid, desc=split, **common)
        dt = time.perf_counter() - t0
        print(f"{split}: {len(paths) - len(skipped)} images ({len(skipped)} skipped) -> "
              f"{out_dir / f'{split}.h5'} in {dt:.1f} s ({len(paths) / dt:.1f} img/s)", file=sys.stderr)
    del encoder

    if score_splits:
        mid = encoder_id(EncoderConfig(kind="clip", name=world["clip"]))
        for split in score_splits:
            out = out_dir / f"clipscore_{split}.h5"
            write_clip_embeddings(out, model, preprocess, images[split], mid,
                                  desc=f"clipscore {split}", **common)
            print(f"clipscore {split}: {out}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
