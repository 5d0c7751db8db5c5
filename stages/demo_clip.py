"""DVC stage demo_clip: train the demo world's small CLIP and measure its zero-shot accuracy.

    python -m stages.demo_clip [--data data/demo/hw3_data] [--out data/demo/clip_demo.pt]

Reads params.yaml's `demo_data` (for the extra single-object training images) and `demo_clip`
(demo.clip_train.DemoClipConfig) sections. Writes the checkpoint (a plain state
dict for clip.load / evaluation.clip_io.load_clip), metrics/demo_clip.json (zero-shot accuracy on the
demo p1 images, overall and for colour and shape separately) and the training curves under
plots/demo_clip/. The metric is computed on the checkpoint reloaded from disk, through the same
code as the zeroshot stage.
"""
import argparse
import csv
import time
from pathlib import Path

import torch

from common.atomic import atomic_open, write_json
from common.errors import ParamsError, run_stage
from demo.clip_train import load_pairs, p1_eval_set, save_clip, train_clip
from demo.scenes import class_label
from evaluation.clip_io import load_clip
from evaluation.zeroshot import class_id_from_filename, class_text_embeddings, embed_images, read_id2label
from common.params import from_section, load_params
from demo.clip_train import DemoClipConfig
from demo.scenes import SceneConfig


def write_csv(path, rows, columns):
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r[c] if not isinstance(r[c], float) else f"{r[c]:.6g}" for c in columns])


def evaluate(ckpt, data_root, scene_cfg, template):
    """Zero-shot on p1_data/val of the reloaded checkpoint: overall, colour and shape accuracy."""
    p1 = Path(data_root) / "p1_data"
    id2label = read_id2label(p1 / "id2label.json")
    classes = scene_cfg.classes()
    expected = {k: class_label(c, s) for k, (c, s) in enumerate(classes)}
    if id2label != expected:
        raise SystemExit(f"{p1 / 'id2label.json'}: does not match params.yaml demo_data "
                         "(re-run the demo_data stage)")
    model, preprocess = load_clip(ckpt)
    paths = sorted((p1 / "val").glob("*.png"))
    emb = embed_images(model, preprocess, paths, desc="zero-shot p1")
    if emb.skipped:
        raise SystemExit(f"{p1 / 'val'}: {len(emb.skipped)} unreadable images")
    with torch.no_grad():
        text = class_text_embeddings(model, [id2label[k] for k in sorted(id2label)], [template])
    pred = (emb.emb @ text.T).argmax(dim=-1).tolist()
    true = [class_id_from_filename(p.name) for p in emb.paths]
    n = len(true)
    colours = {c for c, _ in classes}
    shapes = {s for _, s in classes}
    return {
        "accuracy": sum(p == t for p, t in zip(pred, true)) / n,
        "colour_accuracy": sum(classes[p][0] == classes[t][0] for p, t in zip(pred, true)) / n,
        "shape_accuracy": sum(classes[p][1] == classes[t][1] for p, t in zip(pred, true)) / n,
        "chance": 1 / len(classes),
        "colour_chance": 1 / len(colours),
        "shape_chance": 1 / len(shapes),
        "n_images": n,
        "n_classes": len(classes),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/demo/hw3_data")
    ap.add_argument("--out", default="data/demo/clip_demo.pt")
    ap.add_argument("--metrics", default="metrics/demo_clip.json")
    ap.add_argument("--plots", default="plots/demo_clip")
    ap.add_argument("--log", default="logs/demo_clip.json", help="wall-clock seconds")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    scene_cfg = from_section(SceneConfig, params.get("demo_data"), f"{args.params}: demo_data")
    cfg = from_section(DemoClipConfig, params.get("demo_clip"), f"{args.params}: demo_clip")
    try:
        resolution = cfg.model_resolution(scene_cfg.image_size)
    except ValueError as e:
        raise ParamsError(f"{args.params}: {e}") from None
    data = load_pairs(args.data, scene_cfg, cfg.n_single, resolution)
    eval_set = p1_eval_set(args.data, scene_cfg.image_size, resolution)
    t0 = time.time()
    model, curve = train_clip(cfg, data, resolution, eval_set=eval_set)
    train_seconds = time.time() - t0
    save_clip(model, args.out)

    metrics = evaluate(args.out, args.data, scene_cfg, cfg.template)
    write_json(args.log, {"train_seconds": round(train_seconds, 1)})
    metrics.update(train_steps=cfg.steps,
                   train_pairs=len(data.pixels), train_captions=len(data.tokens),
                   parameters=sum(p.numel() for p in model.parameters()))
    write_json(args.metrics, metrics)
    write_csv(Path(args.plots) / "train.csv", curve, ["step", "loss", "lr"])
    write_csv(Path(args.plots) / "zeroshot.csv", [r for r in curve if "zeroshot_accuracy" in r],
              ["step", "zeroshot_accuracy"])
    print(f"demo CLIP: zero-shot accuracy {metrics['accuracy']:.3f} (colour {metrics['colour_accuracy']:.3f}, "
          f"shape {metrics['shape_accuracy']:.3f}, chance {metrics['chance']:.3f}) after "
          f"{train_seconds:.0f} s of training")


if __name__ == "__main__":
    run_stage(main)
