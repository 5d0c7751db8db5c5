"""Train one captioning variant on cached features: `python -m stages.train --variant lora`.

Reads params `world`, `train`, `bridge`, `peft` and `variants.<variant>`; writes
checkpoints/<variant>/model.safetensors (the best val-CIDEr epoch's trainable tensors),
plots/train/<variant>.json (per-epoch curves) and metrics/train/<variant>.json. Once its params,
decoder, vocabulary and features have been read and checked, it deletes those three, so a run
killed half-way leaves none of them (the checkpoint is written at the end), while a run stopped by
bad input leaves the previous ones alone.
"""
import argparse
import time
from pathlib import Path

import torch

from captioning.captioner import Captioner, CaptionerConfig
from captioning.gpt2 import load_course_checkpoint, weights_id
from captioning.tokenizer import Tokenizer
from common.atomic import remove_outputs, write_json
from common.device import resolve_device
from common.errors import run_stage
from common.params import from_section, load_params
from evaluation.features import FeatureFile
from evaluation.scoring import load_references
from stages.variants import variant_configs
from stages.world import World
from training.loop import CaptionPairs, TrainConfig, train


def in_memory(path):
    features = FeatureFile(path, in_memory=True)
    return features, (features.names, features.all_rows())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    bridge, peft = variant_configs(params, args.params, args.variant)
    train_config = from_section(TrainConfig, params.get("train"), f"{args.params}: train")
    world = from_section(World, params.get("world"), f"{args.params}: world")
    checkpoint = Path("checkpoints") / args.variant / "model.safetensors"
    history_file = Path("plots") / "train" / f"{args.variant}.json"
    metrics_file = Path("metrics") / "train" / f"{args.variant}.json"
    device = torch.device(resolve_device())
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tokenizer = Tokenizer.from_files(world.encoder_json, world.vocab_bpe)
    train_file, train_tokens = in_memory("features/train.h5")
    val_file, val_tokens = in_memory("features/val.h5")
    val_file.require_encoder(train_file.encoder_id)
    decoder = load_course_checkpoint(world.decoder, n_head=world.decoder_heads)
    config = CaptionerConfig(
        decoder=decoder.config, visual_width=train_file.width, visual_tokens=train_file.num_tokens,
        bridge=bridge, peft=peft, encoder_id=train_file.encoder_id, tokenizer_id=tokenizer.identity,
        decoder_id=weights_id(decoder))
    torch.manual_seed(train_config.seed)  # the new modules' initial weights
    model = Captioner(config, decoder)
    counts = model.parameter_counts()
    trainable = sum(t for t, _ in counts.values())
    print(f"{args.variant}: {trainable:,} trainable parameters")

    train_pairs = CaptionPairs(train_tokens, load_references(world.captions("train")), tokenizer)
    val_pairs = CaptionPairs(val_tokens, load_references(world.captions("val")), tokenizer)
    remove_outputs(checkpoint, history_file, metrics_file)
    start = time.time()
    history, best = train(model, train_pairs, val_pairs, tokenizer, train_config, checkpoint, device)
    write_json(history_file, history)
    write_json(metrics_file, {
        "best_epoch": best["epoch"], "best_val_cider": best["val_cider"],
        "trainable_params": trainable, "train_seconds": round(time.time() - start, 1),
        "device": device.type})


if __name__ == "__main__":
    run_stage(main)
