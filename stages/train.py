"""Train one captioning variant on cached features: `python -m stages.train --variant lora`.

Reads params `world`, `train`, `variants.<variant>` and its bridge's and PEFT method's settings;
writes checkpoints/<variant>/model.safetensors (the best val-CIDEr epoch's trainable tensors),
live/train/<variant>/ (dvclive: metrics.json, the numbers the run is judged by, and
plots/metrics/, the curves: train loss and learning rate every LOG_EVERY steps, val loss and val
CIDEr every epoch, a gated bridge's tanh(gate) per block every epoch (gates/block<i>), against
the step) and logs/train/<variant>.json (wall-clock seconds and the device: apart, so that
re-runs do not show as metric changes). Once its params, decoder,
vocabulary and features have been read and checked, it deletes those, so a run killed half-way
leaves none of them (the checkpoint is written at the end), while a run stopped by bad input
leaves the previous ones alone.

Several processes (README: Scale-out): `torchrun --nproc-per-node N -m stages.train --variant V`
(one process per GPU, or per CPU core; several machines through torchrun's rendezvous), or
params `train.nproc_per_node: N`, with which the stage re-runs itself so on this machine. Every
rank reads its rows of the feature files as it needs them (never the whole table); rank 0 alone
evaluates and writes, once every rank has checked its inputs.
"""
import argparse
import socket
import time
from pathlib import Path

import torch

from captioning.captioner import Captioner, CaptionerConfig
from captioning.gpt2 import load_course_checkpoint, weights_id
from captioning.tokenizer import Tokenizer
from common import distributed
from common.atomic import remove_outputs, write_json
from common.device import resolve_device
from common.errors import run_stage
from common.params import from_section, load_params
from evaluation.features import FeatureFile, FileRows
from evaluation.scoring import load_references
from stages.variants import variant_configs
from stages.world import World
from training.loop import CaptionPairs, TrainConfig, TrainingLog, train


class LiveLog(TrainingLog):
    """TrainingLog to dvclive (DVC's own logger): `dvc exp show` and `dvc plots` read its files."""

    def __init__(self, folder):
        from dvclive import Live
        # dvcyaml=None: the stage is declared in dvc.yaml already; save_dvc_exp: dvc exp run does it
        self.live = Live(dir=str(folder), dvcyaml=None, save_dvc_exp=False, report=None)

    def step(self, step, values):
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(f"train/{name}", value, plot=True)   # train/loss, train/lr

    def epoch(self, row):
        super().epoch(row)
        self.live.step = row["step"]
        for name in ("val_loss", "val_cider"):
            self.live.log_metric(f"val/{name[4:]}", row[name], plot=True)
        for block, value in row.get("gates", {}).items():   # gates/block<i>.tsv: tanh(gate)
            self.live.log_metric(f"gates/block{block}", value, plot=True)
        self.live.log_metric("epoch", row["epoch"], plot=False)

    def finish(self, summary):
        self.live.summary.update(summary)
        self.live.make_summary()


def in_memory(path):
    features = FeatureFile(path, in_memory=True)
    return features, (features.names, features.all_rows())


def on_file(path):
    """A feature file read row by row as training asks (a rank under torchrun)."""
    features = FeatureFile(path)
    return features, (features.names, FileRows(features))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    bridge, peft = variant_configs(params, args.params, args.variant)
    train_config = from_section(TrainConfig, params.get("train"), f"{args.params}: train")
    world = from_section(World, params.get("world"), f"{args.params}: world")
    if train_config.nproc_per_node > 1 and not distributed.launched():
        distributed.relaunch("stages.train", ["--variant", args.variant, "--params", args.params],
                             train_config.nproc_per_node,
                             what=f"{args.params}: train.nproc_per_node")
        return
    with distributed.joined(what=f"train {args.variant}") as ranks:
        run(args, bridge, peft, train_config, world, ranks)


def run(args, bridge, peft, train_config, world, ranks=None):
    """Train variant args.variant: as the one process, or as a rank under torchrun (`ranks`)."""
    main = ranks is None or ranks.is_main
    checkpoint = Path("checkpoints") / args.variant / "model.safetensors"
    live_dir = Path("live") / "train" / args.variant
    timing_file = Path("logs") / "train" / f"{args.variant}.json"
    device = torch.device(resolve_device()) if ranks is None else ranks.device
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tokenizer = Tokenizer.from_files(world.encoder_json, world.vocab_bpe)
    read = in_memory if ranks is None else on_file
    train_file, train_tokens = read("features/train.h5")
    val_file, val_tokens = read("features/val.h5")
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
    if main:
        print(f"{args.variant}: {trainable:,} trainable parameters" + (
            f"; {ranks.world_size} processes, outputs written on {socket.gethostname()} (rank 0)"
            if ranks else ""))

    train_pairs = CaptionPairs(train_tokens, load_references(world.captions("train")), tokenizer)
    val_pairs = CaptionPairs(val_tokens, load_references(world.captions("val")), tokenizer)
    if ranks is not None:
        ranks.barrier()   # every rank has checked its inputs: only now may outputs go
        if not main:
            train(model, train_pairs, val_pairs, tokenizer, train_config, checkpoint, device,
                  ranks=ranks)
            return
    remove_outputs(checkpoint, live_dir, timing_file)
    start = time.time()
    log = LiveLog(live_dir)
    _, best = train(model, train_pairs, val_pairs, tokenizer, train_config, checkpoint, device, log,
                    ranks)
    log.finish({"best_epoch": best["epoch"], "best_val_cider": best["val_cider"],
                "trainable_params": trainable})
    timing = {"train_seconds": round(time.time() - start, 1), "device": device.type}
    if ranks is not None:
        timing["processes"] = ranks.world_size
    write_json(timing_file, timing)


if __name__ == "__main__":
    run_stage(main)
