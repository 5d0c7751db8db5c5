"""Caption val and p3 with one variant's kept checkpoint: `python -m stages.decode --variant lora`.

Writes predictions/<variant>/val.json and p3.json ({name: caption}), and val_blind.json: the same
model decoding the val set with the images shuffled across it (a fixed permutation), the blind
baseline that tells how much of the score the image is responsible for. Once the checkpoint,
settings and feature files have been checked, it deletes those three, so that a run stopped
half-way does not leave one run's val.json beside another's p3.json.
"""
import argparse
from pathlib import Path

import torch

from common.atomic import remove_outputs, write_json
from captioning.checkpoint import load_captioner
from common.params import from_section, load_params
from captioning.decoding import DecodeConfig, caption_features
from captioning.tokenizer import Tokenizer
from common.device import resolve_device
from common.errors import run_stage
from evaluation.features import FeatureFile
from stages.world import World


def caption_split(model, tokenizer, features, config, device, permutation=None):
    """{name: caption} of a FeatureFile's rows; with `permutation`, row i is captioned from the
    tokens of row permutation[i]."""
    n = len(features)
    order = permutation if permutation is not None else range(n)
    rows = ((features.names[i], features[j].float()) for i, j in zip(range(n), order))
    return caption_features(model, tokenizer, rows, config, device=device, total=n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    device = resolve_device()
    world = from_section(World, params.get("world"), f"{args.params}: world")
    config = from_section(DecodeConfig, params.get("decode"), f"{args.params}: decode")
    model, _ = load_captioner(Path("checkpoints") / args.variant / "model.safetensors",
                              world.decoder, device)
    tokenizer = Tokenizer.from_files(world.encoder_json, world.vocab_bpe)
    if tokenizer.identity != model.config.tokenizer_id:
        raise SystemExit(f"{world.encoder_json}, {world.vocab_bpe}: not the vocabulary the "
                         f"{args.variant} checkpoint was trained with")
    # read once, and checked: unreadable or stale features stop the run before anything goes
    features = {split: FeatureFile(f"features/{split}.h5", in_memory=True)
                for split in ("val", "p3")}
    for f in features.values():
        f.require_encoder(model.config.encoder_id)
    n_val = len(features["val"])
    if n_val < 2:
        raise SystemExit("decode: the blind baseline pairs each val image with another one's "
                         f"tokens; features/val.h5 has {n_val} image(s)")
    out = Path("predictions") / args.variant
    remove_outputs(*(out / f"{name}.json" for name in ("val", "p3", "val_blind")))
    for split, f in features.items():
        captions = caption_split(model, tokenizer, f, config, device)
        write_json(out / f"{split}.json", captions)
    # A random cycle through the val set: no image is ever paired with its own tokens.
    cycle = torch.randperm(n_val, generator=torch.Generator().manual_seed(0)).tolist()
    permutation = [0] * n_val
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):
        permutation[a] = b
    blind = caption_split(model, tokenizer, features["val"], config, device, permutation)
    write_json(out / "val_blind.json", blind)


if __name__ == "__main__":
    run_stage(main)
