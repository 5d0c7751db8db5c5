"""Score one variant's val captions: `python -m stages.score --variant lora`.

Reads predictions/<variant>/val.json and the references <world.data_root>/p2_data/val.json.
params.yaml:
    world:  {data_root: ..., clip: ...}          # the hw3_data folder; CLIP for CLIPScore
    score:
      metrics: [cider, clipscore, bleu4, meteor, rougeL]
      clip: null                # overrides world.clip
      image_embeddings: null    # e.g. features/clipscore_val.h5 from the extract stage; null:
                                # encode <data_root>/p2_data/images/val/{name}.jpg as the course does
      batch_size: 64
Also scores predictions/<variant>/val_blind.json, the blind baseline, as cider_blind.
Writes metrics/<variant>.json (summary) and predictions/<variant>/val_scores.json (per image),
each atomically.
"""
import argparse
import json
import sys
from pathlib import Path

from models.atomic import write_json
from models.clip_io import load_clip
from models.config import load_params
from models.device import resolve_device
from models.errors import run_stage
from models.scoring import METRICS, load_predictions, load_references, score_captions


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, help="training variant (folder under predictions/)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    world, cfg = params.get("world") or {}, params.get("score") or {}
    if not world.get("data_root"):
        sys.exit(f"{args.params}: needs world.data_root (the hw3_data folder)")
    metrics = tuple(cfg.get("metrics") or METRICS)
    p2 = Path(world["data_root"]) / "p2_data"
    pred_file = Path("predictions") / args.variant / "val.json"

    references = load_references(p2 / "val.json")
    predictions = load_predictions(pred_file, references)
    model = preprocess = embeddings = None
    if "clipscore" in metrics:
        clip_name = cfg.get("clip") or world.get("clip")
        if not clip_name:
            sys.exit(f"{args.params}: CLIPScore needs score.clip or world.clip")
        model, preprocess = load_clip(clip_name, resolve_device())
        if cfg.get("image_embeddings"):
            from models.encoders import EncoderConfig, encoder_id
            from models.features import read_embeddings
            names, array = read_embeddings(cfg["image_embeddings"],
                                           encoder_id(EncoderConfig(kind="clip", name=clip_name)))
            embeddings = (array, names)
    summary, per_image = score_captions(predictions, references, model, preprocess,
                                        images_root=p2 / "images" / "val", embeddings=embeddings,
                                        metrics=metrics, batch_size=int(cfg.get("batch_size", 64)))
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
