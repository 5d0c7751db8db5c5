"""Score one variant's val captions: `python -m stages.score --variant lora`.

Reads predictions/<variant>/val.json and the references <world.data_root>/p2_data/val.json,
params `world` and `score` (ScoreConfig). Also scores predictions/<variant>/val_blind.json, the blind baseline, as cider_blind.
Writes metrics/<variant>.json (summary) and predictions/<variant>/val_scores.json (per image),
each atomically.
"""
import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common.atomic import write_json
from common.device import resolve_device
from common.errors import run_stage
from common.params import from_section, load_params
from evaluation.clip_io import load_clip
from evaluation.scoring import METRICS, load_predictions, load_references, score_captions
from stages.world import World


@dataclass
class ScoreConfig:
    metrics: list = field(default_factory=lambda: list(METRICS))
    clip: Optional[str] = None  # None: world.clip
    # the extract stage's features/clipscore_val.h5; None: encode the val JPEGs as the course does
    image_embeddings: Optional[str] = None
    batch_size: int = 64

    def __post_init__(self):
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ValueError(f"score.metrics={self.metrics}: expected some of {list(METRICS)}")
        if self.batch_size < 1:
            raise ValueError(f"score.batch_size={self.batch_size}: must be at least 1")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, help="training variant (folder under predictions/)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    world = from_section(World, params.get("world"), f"{args.params}: world")
    cfg = from_section(ScoreConfig, params.get("score"), f"{args.params}: score")
    metrics = tuple(cfg.metrics)
    pred_file = Path("predictions") / args.variant / "val.json"

    references = load_references(world.captions("val"))
    predictions = load_predictions(pred_file, references)
    model = preprocess = embeddings = None
    if "clipscore" in metrics:
        clip_name = cfg.clip or world.clip
        model, preprocess = load_clip(clip_name, resolve_device())
        if cfg.image_embeddings:
            from evaluation.encoders import EncoderConfig, encoder_id
            from evaluation.features import read_embeddings
            names, array = read_embeddings(cfg.image_embeddings,
                                           encoder_id(EncoderConfig(kind="clip", name=clip_name)))
            embeddings = (array, names)
    summary, per_image = score_captions(predictions, references, model, preprocess,
                                        images_root=world.image_dir("val"), embeddings=embeddings,
                                        metrics=metrics, batch_size=cfg.batch_size)
    # The blind baseline: the same model captioning val with the images shuffled (stages/decode.py).
    blind_file = Path("predictions") / args.variant / "val_blind.json"
    blind, _ = score_captions(load_predictions(blind_file, references), references,
                              metrics=("cider",), progress=False)
    summary["cider_blind"] = blind["cider"]
    write_json(Path("predictions") / args.variant / "val_scores.json", per_image)
    write_json(Path("metrics") / f"{args.variant}.json", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_stage(main)
