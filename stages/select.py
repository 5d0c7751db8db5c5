"""Pick the variant with the best val CIDEr (ties: CLIPScore) and release what hw3_2.sh needs.

Writes release/: captioner.safetensors (the chosen checkpoint), encoder.json + vocab.bpe (the
tokenizer it was trained with) and selected.json (variant, scores, image encoder, decoding
settings). `dvc pull select` fetches exactly this folder in the real world.
"""
import argparse
import shutil
from dataclasses import asdict
from pathlib import Path

from common.atomic import atomic_dir, write_json
from captioning.decoding import DecodeConfig
from common.errors import InputError, read_json, run_stage
from common.params import from_section, load_params
from stages.extract import ExtractConfig
from stages.variants import read_variants
from stages.world import World


def best_variant(scores):
    """scores: {variant: {"cider": .., "clipscore": .. (optional)}} -> the best variant's name."""
    return max(sorted(scores), key=lambda v: (scores[v]["cider"], scores[v].get("clipscore", 0.0)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    world = from_section(World, params.get("world"), f"{args.params}: world")
    encoder = from_section(ExtractConfig, params.get("extract"), f"{args.params}: extract").encoder
    decode = from_section(DecodeConfig, params.get("decode"), f"{args.params}: decode")
    variants = read_variants(params, args.params)
    scores = {}
    for variant in variants:
        path = Path("metrics") / f"{variant}.json"
        scores[variant] = read_json(path, f"missing: run `dvc repro score@{variant}`")
        if not isinstance(scores[variant], dict) or "cider" not in scores[variant]:
            raise InputError(f"{path} has no cider: keep `cider` in score.metrics")
    chosen = best_variant(scores)
    release = Path("release")
    with atomic_dir(release) as tmp:  # the whole folder appears at once
        shutil.copyfile(Path("checkpoints") / chosen / "model.safetensors", tmp / "captioner.safetensors")
        shutil.copyfile(world.encoder_json, tmp / "encoder.json")
        shutil.copyfile(world.vocab_bpe, tmp / "vocab.bpe")
        write_json(tmp / "selected.json", {
            "variant": chosen, "scores": scores[chosen],
            "encoder": asdict(encoder), "decode": asdict(decode),
            "decoder_heads": world.decoder_heads})
    print(f"selected {chosen}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores[chosen].items()
                                             if k in ("cider", "clipscore")))


if __name__ == "__main__":
    run_stage(main)
