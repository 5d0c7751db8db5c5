"""The report: one Markdown page (report/README.md) with its figures, built only from the files the
pipeline wrote (metrics/, plots/, figures/, release/) and params.yaml, so `dvc repro` regenerates
it whenever any of them changes and it can never show a stale number.

Required inputs (an error names the missing file): metrics/<variant>.json, metrics/train/<variant>.json
and plots/train/<variant>.json of every variant in params `variants:`, and the metrics files that
`report.world_metrics` names. Optional sections appear only when their files exist:
release/selected.json, metrics/zeroshot.json (+ zeroshot_classes.json, figures/zeroshot/),
figures/attention/, figures/pos_embed_similarity.png.
"""
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from common import errors
from reporting.attention_maps import pyplot, save_figure
from common.errors import InputError

METRICS = (("cider", "CIDEr"), ("clipscore", "CLIPScore"), ("bleu4", "BLEU-4"),
           ("meteor", "METEOR"), ("rougeL", "ROUGE-L"), ("cider_blind", "blind CIDEr"))
PARAM_SECTIONS = ("world", "extract", "bridge", "peft", "variants", "train", "decode", "visualize")


class ReportError(InputError):
    """A pipeline output the report needs is missing or unreadable; str() names the file."""


@dataclass
class ReportConfig:
    note: Optional[str] = None  # shown first, e.g. that the world's numbers are not the course's
    world_metrics: list = field(default_factory=list)  # metrics of the world's own models


def read_json(path, required=True):
    """A pipeline output; None for a missing one that is not `required`."""
    if not required and not Path(path).is_file():
        return None
    return errors.read_json(path, "missing (run `dvc repro` to make it)", ReportError)


def fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def flat_scalars(obj, prefix=""):
    """(key path, value) of every number/string/bool leaf of a JSON object (lists summarised)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += flat_scalars(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj) and obj:
            out.append((prefix[:-1], f"{len(obj)} values, last {fmt(obj[-1])}"))
        else:
            out.append((prefix[:-1], f"list of {len(obj)}"))
    else:
        out.append((prefix[:-1], obj))
    return out


# --- inputs -------------------------------------------------------------------------------------

# the training curves dvclive writes for a variant (stages/train.py): name -> (file, column)
CURVES = {"train_loss": ("train/loss.tsv", "loss"), "lr": ("train/lr.tsv", "lr"),
          "val_loss": ("val/loss.tsv", "loss"), "val_cider": ("val/cider.tsv", "cider")}


def read_curve(path, column, required=True):
    """[(step, value)] of a dvclive TSV (columns step and `column`); [] for a missing one that is
    not `required`."""
    if not required and not Path(path).is_file():
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ReportError(f"{path}: missing (run `dvc repro` to make it) ({e.strerror})") from None
    header = lines[0].split("\t") if lines else []
    if header != ["step", column]:
        raise ReportError(f"{path}: expected the columns step and {column}, got {header}")
    try:
        return [(int(s), float(v)) for s, v in (line.split("\t") for line in lines[1:])]
    except ValueError as e:
        raise ReportError(f"{path}: not a curve of numbers ({e})") from None


def read_gates(folder):
    """{decoder block: [(step, tanh(gate))]} of a gated bridge (dvclive's gates/block<i>.tsv);
    {} for the other bridges."""
    files = Path(folder).glob("block*.tsv")
    return dict(sorted((int(f.stem[5:]), read_curve(f, f.stem)) for f in files))


def load_variants(root, variants):
    """{variant: {"spec", "metrics", "train", "timing", "curves"}} for every variant of params
    `variants:`: its scores, its training summary and curves (dvclive), its timing if any."""
    if not variants:
        raise ReportError("params.yaml: no `variants:` to report")
    out = {}
    for name, spec in variants.items():
        live = root / "live" / "train" / name
        out[name] = {
            "spec": spec or {},
            "metrics": read_json(root / "metrics" / f"{name}.json"),
            "train": read_json(live / "metrics.json"),
            "timing": read_json(root / "logs" / "train" / f"{name}.json", required=False) or {},
            # the step curves are written every LOG_EVERY steps: none in a shorter run
            "curves": {key: read_curve(live / "plots" / "metrics" / file, column,
                                       required=file.startswith("val/"))
                       for key, (file, column) in CURVES.items()},
            "gates": read_gates(live / "plots" / "metrics" / "gates"),
        }
    return out


def variant_curves(variants):
    """The curves of every variant in one long table per kind, for DVC's plots of all variants
    (dvc.yaml, template .dvc/plots/variants.json): {"train": rows of step, variant, loss, lr;
    "val": rows of step, variant, val_loss, val_cider}."""
    tables = {}
    for kind, keys in (("train", ("train_loss", "lr")), ("val", ("val_loss", "val_cider"))):
        rows = []
        for name, v in variants.items():
            columns = [dict(v["curves"][k]) for k in keys]
            for step in sorted(columns[0]):
                rows.append({"step": step, "variant": name,
                             **{k: c.get(step) for k, c in zip(keys, columns)}})
        tables[kind] = rows
    return tables


# --- figures ------------------------------------------------------------------------------------

def plot_training_curves(path, variants):
    """Val CIDEr (every epoch), train loss (every few steps) and val loss (every epoch) against
    the training step, one line per variant."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("val_cider", "val CIDEr"), ("train_loss", "train loss"), ("val_loss", "val loss"))
    for ax, (key, label) in zip(axes, panels):
        for name, v in variants.items():
            points = v["curves"][key]
            if points:
                ax.plot(*zip(*points), marker="o" if key != "train_loss" else None, ms=3,
                        label=name)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_gates(path, variants):
    """tanh(gate) of every decoder block against the step, one panel per gated variant (how far
    each block lets the image in; all start at tanh(gate_init), 0 by default). False when no
    variant has gates."""
    gated = {name: v["gates"] for name, v in variants.items() if v["gates"]}
    if not gated:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(gated), figsize=(5 * len(gated), 3.6), squeeze=False)
    for ax, (name, gates) in zip(axes[0], gated.items()):
        colours = plt.cm.viridis([i / max(1, len(gates) - 1) for i in range(len(gates))])
        for colour, (block, points) in zip(colours, gates.items()):
            ax.plot(*zip(*points), marker="o", ms=3, color=colour, label=f"block {block}")
        ax.set_xlabel("step")
        ax.set_title(f"{name}: tanh(gate)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_variant_scores(path, variants):
    """CIDEr (with the blind baseline) and CLIPScore per variant, side by side."""
    plt = pyplot()
    names = list(variants)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.5))
    y = range(len(names))
    cider = [variants[n]["metrics"].get("cider", 0) for n in names]
    blind = [variants[n]["metrics"].get("cider_blind") for n in names]
    axes[0].barh(y, cider, color="tab:blue", label="CIDEr")
    if all(b is not None for b in blind):
        axes[0].barh(y, blind, color="tab:gray", height=0.4, label="blind (shuffled images)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("val CIDEr")
    axes[1].barh(y, [variants[n]["metrics"].get("clipscore", 0) for n in names], color="tab:green")
    axes[1].set_title("val CLIPScore")
    for ax in axes:
        ax.set_yticks(list(y), names)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# --- the page -----------------------------------------------------------------------------------

def _copy(src, out_dir, rel):
    """Copy a figure into the report folder; return its link (relative to the page)."""
    dst = out_dir / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return rel


def variants_section(variants, selected):
    headers = (["variant", "bridge", "PEFT"] + [label for _, label in METRICS]
               + ["trainable params", "train time", "best epoch"])
    rows = []
    for name, v in variants.items():
        m, t = v["metrics"], v["train"]
        mark = " **(selected)**" if selected and selected.get("variant") == name else ""
        secs = v["timing"].get("train_seconds")
        rows.append([f"`{name}`{mark}", v["spec"].get("bridge", "–"), v["spec"].get("peft", "–")]
                    + [fmt(m.get(k)) for k, _ in METRICS]
                    + [fmt(t.get("trainable_params")),
                       "–" if secs is None else f"{secs / 60:.1f} min",
                       fmt(t.get("best_epoch"))])
    n_images = {v["metrics"].get("n_images") for v in variants.values()}
    lines = [
        "## Captioning (problem 2): every PEFT variant",
        "",
        f"Scores on the val split ({', '.join(fmt(n) for n in sorted(n_images, key=str))} images). "
        "*CIDEr* (coco-caption CIDEr-D on PTBTokenizer words; it selects the released variant) "
        "and *CLIPScore* as the course's `p2_evaluate.py` computes them; "
        "*blind CIDEr* is the same model captioning val with the "
        "images shuffled across it: what the language model scores without looking.",
        "",
        table(headers, rows),
        "",
        "![val CIDEr and CLIPScore per variant](figures/variant_scores.png)",
        "",
        "### Training curves",
        "",
        "Val CIDEr is greedy decoding on a subset of val after every epoch (the checkpoint kept "
        "is the best epoch's).",
        "",
        "![training curves](figures/training_curves.png)",
        "",
    ]
    return lines


def zeroshot_section(root, out_dir, zs, details):
    lines = ["## CLIP zero-shot classification (problem 1)", ""]
    templates = (details or {}).get("templates", {})
    acc = zs.get("accuracy", {})
    rows = []
    for slug, a in sorted(acc.items(), key=lambda kv: -kv[1]):
        text = ("ensemble of the templates" if slug == "ensemble"
                else f"`{templates.get(slug, slug)}`")
        rows.append([text, fmt(a, 4)])
    lines += [f"Accuracy on {fmt(zs.get('n_images'))} p1 images per prompt template "
              f"(predictions use: {(details or {}).get('predict_with', '–')}, accuracy "
              f"{fmt(zs.get('predict_with_accuracy'), 4)}).", "", table(["template", "accuracy"], rows), ""]
    figures = root / "figures" / "zeroshot"
    for name, caption in (("template_accuracy.png", "accuracy per template"),
                          ("per_class.png", "accuracy per class"),
                          ("confusion.png", "confusion matrix")):
        if (figures / name).is_file():
            lines += [f"![{caption}]({_copy(figures / name, out_dir, f'figures/zeroshot/{name}')})", ""]
    for kind, caption in (("success", "the most confident right predictions"),
                          ("failure", "the most confident wrong predictions")):
        top5 = sorted(figures.glob(f"top5_{kind}_*.png")) if figures.is_dir() else []
        if top5:
            lines += [f"Top-5 classes of {caption}:", ""]
            lines += [f"![top-5 {kind}]({_copy(p, out_dir, f'figures/zeroshot/{p.name}')})"
                      for p in top5]
            lines.append("")
    return lines


def attention_section(root, out_dir, summary):
    figures = root / "figures" / "attention"
    maps = summary.get("maps", {})
    lines = ["## Attention over the image, word by word (problem 3)", "",
             f"Captions of the released variant `{summary.get('variant')}`; each panel is the "
             f"attention of the query that produced the word over the image patches (decoder "
             f"blocks `{maps.get('layers', '–')}`, heads reduced by {maps.get('head_reduce', '–')}, "
             f"blocks by {maps.get('layer_reduce', '–')}; a word's BPE tokens merged by "
             f"{maps.get('word_merge', '–')}), class token dropped, each panel on its own colour "
             "scale.", ""]
    for e in summary.get("p3", []):
        name = Path(e["figure"]).name
        lines += [f"**{e['name']}**: {e['caption']}{flag_text(e)}", "",
                  f"![{e['name']}]({_copy(figures / name, out_dir, f'figures/attention/{name}')})", ""]
        if e.get("layers_figure"):
            name = Path(e["layers_figure"]).name
            lines += [f"Each decoder layer's maps for **{e['name']}** (one row per block with "
                      "attention over the image):", "",
                      f"![layers]({_copy(figures / name, out_dir, f'figures/attention/{name}')})", ""]
    for which, e in (summary.get("val") or {}).items():
        name = Path(e["figure"]).name
        lines += [f"**Val image with the {which} CLIPScore** ({e['name']}, CLIPScore "
                  f"{fmt(e.get('clipscore'))}): {e['caption']}{flag_text(e)}", "",
                  f"![val {which}]({_copy(figures / name, out_dir, f'figures/attention/{name}')})", ""]
    hits = summary.get("shape_word_hits")
    if hits:
        lines += [f"Shape words in the p3 captions: {hits['shape_words']}; the attention peak lies "
                  f"in the bounding box of an object of the named shape for "
                  f"{hits['peak_on_named_shape']}, the object with the most attention (mean over "
                  f"its bounding box) is of the named shape for "
                  f"{hits['most_attention_on_named_shape']} (the named shape is in the image for "
                  f"{hits['named_shape_in_image']}). Per word: `figures/attention/summary.json`.", ""]
        rows = [[e["name"], w["word"], f"({w['patch'][0]}, {w['patch'][1]})",
                 w.get("peak_object") or "background", w.get("most_attended_object") or "–",
                 "yes" if w.get("peak_on_named_shape") else "no"]
                for e in summary.get("p3", []) for w in e.get("shape_words", [])]
        if rows:
            lines += [table(["image", "word", "peak patch (row, col)", "object whose box holds the peak",
                             "object with the most attention", "peak in a box of the named shape"],
                            rows), ""]
    return lines


def flag_text(entry):
    """A caption's flags (stages/visualize.py), as a few words after it."""
    flags = []
    if entry.get("repeated_words"):
        flags.append("repeats " + ", ".join(f"“{w}”" for w in entry["repeated_words"]))
    if entry.get("names_an_object") is False:
        flags.append("names no object of the image")
    return f" — **flagged: {'; '.join(flags)}**" if flags else ""


def world_section(root, files):
    if not files:
        return []
    lines = ["## The world's own models", ""]
    for rel in files:
        lines += [f"### `{rel}`", "", table(["key", "value"], [
            [k, fmt(v, 4)] for k, v in flat_scalars(read_json(root / rel))]), ""]
    return lines


def stale_baseline(rows, variants):
    """The variants whose val CIDEr in a comparison's baseline rows is not this run's: that sweep
    ran against an earlier commit (its experiments then compare with numbers no longer shown)."""
    return [r["variant"] for r in rows if r.get("experiment") == "baseline" and (
        r.get("variant") not in variants
        or r.get("cider") != variants[r["variant"]]["metrics"].get("cider"))]


def sweeps_section(root, out_dir, variants):
    """The sweeps compared by `python -m scripts.compare` (comparisons/<sweep>.json and .png),
    each flagged when its baseline is not this run's (`variants`, load_variants)."""
    files = sorted((root / "comparisons").glob("*.json"))
    if not files:
        return []
    lines = ["## Sweeps: runs compared", "",
             "Experiments queued by `python -m scripts.sweep NAME --run` and compared with "
             "`python -m scripts.compare`, each next to the baseline commit; a sweep's rows are the "
             "variants its params reach (train seconds, val decoding speed and caption length from "
             "the experiment's own outputs; – where that experiment ran elsewhere). Train time and "
             "decode speed are wall clock as each run went, with whatever else shared the machine "
             "(parallel queue workers, their thread counts): compare them only between runs made "
             "the same way.", ""]
    for path in files:
        rows = read_json(path)
        sweep = path.stem
        lines += [f"### `{sweep}`", ""]
        stale = stale_baseline(rows, variants)
        if stale:
            named = ", ".join(f"`{v}`" for v in stale)
            lines += [f"**Stale**: this sweep's baseline scores of {named} are not this run's "
                      "(above): its experiments ran against an earlier commit. Re-run "
                      f"`python -m scripts.sweep {sweep} --run` and `python -m scripts.compare`.", ""]
        lines += [table(
            ["experiment", "changed params", "variant", "CIDEr", "CLIPScore", "blind CIDEr",
             "trainable params", "train time", "decode captions/s", "words per caption"],
            [[r.get("experiment"), ", ".join(f"`{k}={v}`" for k, v in r.get("changes", {}).items())
              or "–", f"`{r.get('variant')}`", fmt(r.get("cider")), fmt(r.get("clipscore")),
              fmt(r.get("cider_blind")), fmt(r.get("trainable_params")),
              "–" if r.get("train_seconds") is None else f"{r['train_seconds'] / 60:.1f} min",
              fmt(r.get("decode_captions_per_second"), 1), fmt(r.get("caption_words"), 1)]
             for r in rows]), ""]
        figure = path.with_suffix(".png")
        if figure.is_file():
            lines += [f"![{sweep}]({_copy(figure, out_dir, f'figures/sweeps/{sweep}.png')})", ""]
    return lines


def reproduce_section(variants, has):
    v = next(iter(variants))
    rows = [
        ["everything on this page", "`dvc repro`"],
        ["one variant's metrics row", f"`dvc repro score@{v}` (train, decode and score `{v}`)"],
        ["all metrics, compared with the last commit", "`dvc metrics show` / `dvc metrics diff`"],
        ["training curves of every variant", "`dvc plots show` (data: `live/train/<variant>/`)"],
        ["an experiment, e.g. LoRA rank 16", "`dvc exp run -S peft.lora.rank=16` then `dvc exp show`"],
        ["the released model (hw3_2.sh's)", "`dvc repro select`"],
        ["captions of any folder", "`bash hw3_2.sh IMG_DIR OUT_JSON DECODER_BIN`"],
    ]
    if has.get("zeroshot"):
        rows.append(["zero-shot table and figures", "`dvc repro zeroshot`; "
                     "`bash hw3_1.sh IMG_DIR ID2LABEL_JSON OUT_CSV`"])
    if has.get("attention"):
        rows.append(["attention figures, positional-embedding similarity", "`dvc repro visualize`"])
    rows.append(["this page", "`dvc repro report`"])
    return ["## How to reproduce each number", "", table(["what", "command"], rows), ""]


def build_report(root, params, config, out_dir):
    """Write `out_dir`/README.md and its figures from the pipeline outputs under `root`, the params
    (a dict) and `config` (ReportConfig). Returns the variants read (load_variants)."""
    root, out_dir = Path(root), Path(out_dir)
    variants = load_variants(root, params.get("variants"))
    selected = read_json(root / "release" / "selected.json", required=False)
    zs = read_json(root / "metrics" / "zeroshot.json", required=False)
    zs_details = read_json(root / "metrics" / "zeroshot_classes.json", required=False)
    attention = read_json(root / "figures" / "attention" / "summary.json", required=False)

    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    plot_training_curves(out_dir / "figures" / "training_curves.png", variants)
    plot_variant_scores(out_dir / "figures" / "variant_scores.png", variants)
    gates = plot_gates(out_dir / "figures" / "gates.png", variants)

    lines = ["# Parameter-efficient image captioning and CLIP zero-shot: results", "",
             "Generated by `dvc repro` (stage `report`, `stages/report.py`) from the pipeline's "
             "outputs; do not edit by hand.", ""]
    if config.note:
        lines += [f"> {' '.join(config.note.split())}", ""]
    if selected:
        s = selected.get("scores", {})
        lines += [f"Released variant (best val CIDEr; what `hw3_2.sh` uses): `{selected['variant']}` "
                  f"(CIDEr {fmt(s.get('cider'))}, CLIPScore {fmt(s.get('clipscore'))}), decoding "
                  f"`{json.dumps(selected.get('decode'))}`.", ""]
    lines += variants_section(variants, selected)
    if gates:
        lines += ["### Gates", "",
                  "tanh(gate) of each decoder block's cross-attention after every epoch, for the "
                  "gated bridges: how far each block lets the image in (they start at "
                  "tanh(`gate_init`), 0 by default: the plain language model at step 0).", "",
                  "![gate values per block](figures/gates.png)", ""]
    if zs:
        lines += zeroshot_section(root, out_dir, zs, zs_details)
    if attention:
        lines += attention_section(root, out_dir, attention)
    pos = root / "figures" / "pos_embed_similarity.png"
    if pos.is_file():
        lines += ["### Positional embeddings of the image encoder", "",
                  "Cosine similarity of each patch position's embedding with every other's (one "
                  "small map per position, laid out on the patch grid).", "",
                  f"![positional embedding similarity]({_copy(pos, out_dir, 'figures/pos_embed_similarity.png')})", ""]
    lines += sweeps_section(root, out_dir, variants)
    lines += world_section(root, config.world_metrics)
    lines += reproduce_section(variants, {"zeroshot": zs, "attention": attention})
    shown = {k: params[k] for k in PARAM_SECTIONS if k in params}
    lines += ["## Parameters of this run", "", "```yaml",
              yaml.safe_dump(shown, sort_keys=False).rstrip(), "```", ""]
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return variants
