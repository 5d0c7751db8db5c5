"""Caption val and p3 with one variant's kept checkpoint: `python -m stages.decode --variant lora`.

Writes predictions/<variant>/val.json and p3.json ({name: caption}), and val_blind.json: the same
model decoding the val set with the images shuffled across it (a fixed permutation), the blind
baseline that tells how much of the score the image is responsible for; and
logs/decode/<variant>.json, the wall-clock seconds of the val decoding and its captions per second
(apart from the metrics, so that re-runs do not show as changes). Once the checkpoint,
settings and feature files have been checked, it deletes those three, so that a run stopped
half-way does not leave one run's val.json beside another's p3.json.

Several processes: `torchrun --nproc-per-node N -m stages.decode --variant V`, or
`decode.nproc_per_node: N` (the stage re-runs itself so): each rank decodes its blocks of
`decode.batch_size` images (the batches one process makes, so the same captions), reading only
their rows; rank 0 gathers and writes each file once. Sampling draws from one random stream
across batches: with decode.method sample rank 0 decodes everything, as one process does.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from common import distributed
from common.atomic import remove_outputs, write_json
from captioning.checkpoint import load_captioner
from common.params import from_section, load_params
from captioning.decoding import DecodeConfig, caption_features
from captioning.tokenizer import Tokenizer
from common.device import resolve_device
from common.errors import run_stage
from evaluation.features import FeatureFile
from stages.world import World


def caption_split(model, tokenizer, features, config, device, permutation=None, ranks=None):
    """{name: caption} of a FeatureFile's rows; with `permutation`, row i is captioned from the
    tokens of row permutation[i]. ranks (under torchrun): every rank decodes its blocks of
    config.batch_size rows and rank 0 returns them all, in row order (the others: None)."""
    n = len(features)
    order = permutation if permutation is not None else range(n)
    if ranks is None:
        rows = ((features.names[i], features[j].float()) for i, j in zip(range(n), order))
        return caption_features(model, tokenizer, rows, config, device=device, total=n)
    if config.method == "sample":   # one random stream across batches: one process
        return caption_split(model, tokenizer, features, config, device, permutation) \
            if ranks.is_main else None
    mine = ranks.blocks(n, config.batch_size)
    rows = ((features.names[i], features[order[i]].float()) for i in mine)
    own = caption_features(model, tokenizer, rows, config, device=device, total=len(mine))
    parts = ranks.gather(own)
    if not ranks.is_main:
        return None
    captions = {name: caption for part in parts for name, caption in part.items()}
    return {name: captions[name] for name in features.names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    world = from_section(World, params.get("world"), f"{args.params}: world")
    config = from_section(DecodeConfig, params.get("decode"), f"{args.params}: decode")
    if config.nproc_per_node > 1 and not distributed.launched():
        distributed.relaunch("stages.decode", ["--variant", args.variant, "--params", args.params],
                             config.nproc_per_node, what=f"{args.params}: decode.nproc_per_node")
        return
    with distributed.joined(what=f"decode {args.variant}") as ranks:
        run(args, world, config, ranks)


def run(args, world, config, ranks=None):
    """Decode with variant args.variant: as the one process, or as a rank under torchrun."""
    main = ranks is None or ranks.is_main
    device = resolve_device() if ranks is None else str(ranks.device)
    model, _ = load_captioner(Path("checkpoints") / args.variant / "model.safetensors",
                              world.decoder, device)
    tokenizer = Tokenizer.from_files(world.encoder_json, world.vocab_bpe)
    if tokenizer.identity != model.config.tokenizer_id:
        raise SystemExit(f"{world.encoder_json}, {world.vocab_bpe}: not the vocabulary the "
                         f"{args.variant} checkpoint was trained with")
    # read once, and checked: unreadable or stale features stop the run before anything goes
    # (a rank under torchrun reads only its rows, as it decodes them)
    features = {split: FeatureFile(f"features/{split}.h5", in_memory=ranks is None)
                for split in ("val", "p3")}
    for f in features.values():
        f.require_encoder(model.config.encoder_id)
    n_val = len(features["val"])
    if n_val < 2:
        raise SystemExit("decode: the blind baseline pairs each val image with another one's "
                         f"tokens; features/val.h5 has {n_val} image(s)")
    if ranks is not None:
        ranks.barrier()   # every rank has checked its inputs: only now may outputs go
        if main and config.method == "sample":
            print(f"decode {args.variant}: decode.method sample draws one random stream across "
                  "batches: rank 0 decodes every image (the same captions as one process)",
                  file=sys.stderr)
    out = Path("predictions") / args.variant
    log = Path("logs") / "decode" / f"{args.variant}.json"
    if main:
        remove_outputs(*(out / f"{name}.json" for name in ("val", "p3", "val_blind")), log)
    for split, f in features.items():
        start = time.perf_counter()
        captions = caption_split(model, tokenizer, f, config, device, ranks=ranks)
        if main:
            write_json(out / f"{split}.json", captions)
            if split == "val":
                seconds = time.perf_counter() - start
                timing = {"val_seconds": round(seconds, 3), "val_images": len(captions),
                          "val_captions_per_second": round(len(captions) / seconds, 1),
                          "device": device, "processes": 1 if ranks is None else ranks.world_size}
    # A random cycle through the val set: no image is ever paired with its own tokens.
    cycle = torch.randperm(n_val, generator=torch.Generator().manual_seed(0)).tolist()
    permutation = [0] * n_val
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):
        permutation[a] = b
    blind = caption_split(model, tokenizer, features["val"], config, device, permutation, ranks)
    if main:
        write_json(out / "val_blind.json", blind)
        write_json(log, timing)


if __name__ == "__main__":
    run_stage(main)
