"""Stage `zeroshot`: CLIP zero-shot on p1_data/<split> -- one accuracy per prompt template and for
the prompt ensemble (DVC metrics), predictions/p1.csv (the same predictions hw3_1.sh makes),
per-class accuracy and most-confused pairs, and figures.

    python -m stages.zeroshot            (reads params.yaml: zeroshot)
"""
import argparse
import sys
from pathlib import Path

import torch

from common.atomic import write_json
from evaluation.clip_io import load_clip
from common.params import from_section, load_params
from common.errors import run_stage
from common.imageio import list_images, load_rgb
from evaluation import zeroshot as zs
from stages.world import World

METRICS = Path("metrics/zeroshot.json")
DETAILS = Path("metrics/zeroshot_classes.json")
PREDICTIONS = Path("predictions/p1.csv")
FIGURES = Path("figures/zeroshot")


def unique_slugs(templates):
    slugs = []
    for t in templates:
        s = zs.template_slug(t)
        while s in slugs or s == "ensemble":
            s += "_"
        slugs.append(s)
    return slugs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    cfg = zs.ZeroShotConfig.from_params(params.get("zeroshot"), args.params)
    torch.manual_seed(cfg.seed)

    data_root = cfg.data_root or from_section(World, params.get("world"),
                                              f"{args.params}: world").data_root
    p1 = Path(data_root) / "p1_data"
    id2label = zs.read_id2label(p1 / "id2label.json")
    paths = list_images(p1 / cfg.split, stream=sys.stderr)
    model, preprocess = load_clip(cfg.clip, device=cfg.torch_device())
    emb = zs.embed_images(model, preprocess, paths, cfg.batch_size, cfg.num_workers)
    true = zs.true_labels(emb.paths, id2label)

    studied = list(zip(unique_slugs(cfg.templates), cfg.templates))
    studied.append(("ensemble", None))
    results = {}
    for slug, template in studied:
        pred, probs = zs.classify(model, emb, id2label, [template] if template else cfg.ensemble)
        results[slug] = (pred, probs, zs.score(pred, true, id2label, cfg.n_confused))
    chosen = "ensemble" if cfg.predict_with == "ensemble" else dict(
        (t, s) for s, t in studied if t)[cfg.predict_with]
    pred, probs, sc = results[chosen]

    accuracy = {slug: r[2].accuracy for slug, r in results.items()}
    best_single = max((s for s, t in studied if t), key=lambda s: accuracy[s])
    write_json(METRICS, {
        "accuracy": accuracy,
        "predict_with_accuracy": sc.accuracy,
        "ensemble_minus_best_template": accuracy["ensemble"] - accuracy[best_single],
        "n_images": len(emb.paths), "n_labelled": sc.n, "n_skipped": len(emb.skipped),
    })
    zs.write_predictions_csv(PREDICTIONS, [p.name for p in emb.paths], pred)

    top5 = []   # the most confident right and wrong predictions: what the model does and misses
    successes, failures = zs.confident_examples(probs, pred, true, cfg.n_top5)
    for kind, rows_of in (("success", successes), ("failure", failures)):
        for k, i in enumerate(rows_of):
            rows = zs.top_k(probs[i], id2label, 5)
            top5.append(dict(kind=kind, filename=emb.paths[i].name, true=true[i],
                             top5=[dict(id=c, name=n, prob=p) for c, n, p in rows]))
            zs.plot_top5(FIGURES / f"top5_{kind}_{k}.png", load_rgb(emb.paths[i]),
                         emb.paths[i].name, rows, true[i], id2label.get(true[i]))

    write_json(DETAILS, {
        "clip": cfg.clip, "predict_with": cfg.predict_with, "best_single_template": best_single,
        "templates": {s: t for s, t in studied if t}, "ensemble_templates": cfg.ensemble,
        "accuracy": accuracy, "per_class": sc.per_class, "confused_pairs": sc.confused_pairs,
        "top5": top5, "skipped": [str(e) for e in emb.skipped],
    })

    label = {s: (t if t else f"ensemble of {len(cfg.ensemble)} templates") for s, t in studied}
    zs.plot_template_accuracy(FIGURES / "template_accuracy.png",
                              [(label[s], accuracy[s]) for s, _ in studied],
                              chance=1 / len(id2label), highlight=label[chosen])
    zs.plot_per_class(FIGURES / "per_class.png", sc.per_class)
    zs.plot_confusion(FIGURES / "confusion.png", pred, true, id2label)

    width = max(len(label[s]) for s, _ in studied)
    for s, _ in sorted(studied, key=lambda st: -accuracy[st[0]]):
        print(f"{label[s]:<{width}}  {accuracy[s]:.4f}" + ("  <- predictions" if s == chosen else ""))


if __name__ == "__main__":
    run_stage(main)
