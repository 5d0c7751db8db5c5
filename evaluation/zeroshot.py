"""CLIP zero-shot classification: prompts -> class embeddings, images -> probabilities, scores.

Prompt templates hold the placeholder `{object}` (replaced by plain string substitution, so other
braces are harmless); underscores in class names become spaces ("aquarium_fish" -> "aquarium
fish"). A prompt *ensemble* is the CLIP paper's: the mean over templates of the normalised text
embeddings, renormalised.
"""
import csv
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.atomic import atomic_open, atomic_path
from evaluation.clip_io import clip
from common.params import from_section
from common.device import resolve_device
from common.errors import InputError, ParamsError
from common.imageio import image_loader, report_skip

PLACEHOLDER = "{object}"
_LABELLED = re.compile(r"^(\d+)_")   # {class_id}_{image_id}.png


@dataclass
class ZeroShotConfig:
    """The `zeroshot:` section of params.yaml."""
    clip: str = "data/demo/clip_demo.pt"      # a file (state dict / TorchScript) or a CLIP name
    data_root: Optional[str] = None           # p1_data/<split>/, p1_data/id2label.json; None:
                                              # params.yaml's world.data_root
    split: str = "val"
    templates: list = field(default_factory=lambda: ["{object}"])   # studied one by one
    ensemble: list = field(default_factory=lambda: ["a photo of a {object}."])
    predict_with: str = "ensemble"            # "ensemble" or one of `templates`: p1.csv, hw3_1.sh
    batch_size: int = 64
    num_workers: int = 0
    n_top5: int = 3
    n_confused: int = 10
    seed: int = 0
    device: str = "auto"                      # auto = cuda if available, else cpu

    def __post_init__(self):
        for name in ("templates", "ensemble"):
            try:
                check_templates(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"zeroshot.{name}: {e}") from None
        for name in ("batch_size", "n_top5", "n_confused", "num_workers", "seed"):
            least = 1 if name == "batch_size" else 0
            if getattr(self, name) < least:
                raise ValueError(f"zeroshot.{name}={getattr(self, name)!r}: must be at least {least}")
        if self.predict_with != "ensemble" and self.predict_with not in self.templates:
            raise ValueError(f"zeroshot.predict_with must be 'ensemble' or one of "
                             f"zeroshot.templates, got {self.predict_with!r}")

    @classmethod
    def from_params(cls, section, source="params.yaml"):
        """The `zeroshot:` section of the params read from `source`; it must be there (an empty
        one would otherwise quietly mean the demo CLIP)."""
        if section is None:
            raise ParamsError(f"{source}: the zeroshot section is empty")
        return from_section(cls, section, f"{source}: zeroshot")

    def prediction_templates(self):
        return self.ensemble if self.predict_with == "ensemble" else [self.predict_with]

    def torch_device(self):
        return resolve_device(self.device, "zeroshot.device")


class LabelMapError(InputError):
    """An id2label.json that is not a mapping of integer ids to names; names the file."""


class _Pairs(list):
    """A JSON object read as its list of (key, value) pairs."""


def read_id2label(path):
    """{int id: name}, sorted by id, from a JSON object such as {"0": "bicycle", ...}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise LabelMapError(f"{path}: id2label file does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise LabelMapError(f"{path}: cannot read id2label file ({e})") from e
    try:   # the object as (key, value) pairs: a key written twice must not quietly keep one
        obj = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise LabelMapError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, _Pairs):
        raise LabelMapError(f"{path}: expected a JSON object {{\"0\": \"name\", ...}}, "
                            f"got a JSON {type(obj).__name__}")
    if not obj:
        raise LabelMapError(f"{path}: the id -> name mapping is empty")
    out = {}
    for k, v in obj:
        if not re.fullmatch(r"\d+", str(k).strip()):
            raise LabelMapError(f"{path}: key {k!r} is not a non-negative integer id")
        if not isinstance(v, str) or not v.strip():
            raise LabelMapError(f"{path}: the name for id {k!r} is {v!r}, not a non-empty string")
        i = int(k)
        if i in out:
            raise LabelMapError(f"{path}: id {i} appears twice ({k!r})")
        out[i] = v.strip()
    return dict(sorted(out.items()))


def class_id_from_filename(name):
    """The class id of `{class_id}_{image_id}.ext`, or None for any other name."""
    m = _LABELLED.match(Path(name).name)
    return int(m.group(1)) if m else None


def true_labels(paths, id2label, stream=None):
    """The class id of each image from its file name, with one note for the names that carry no
    id (left out of the accuracy) and one for ids that id2label.json lacks (counted as wrong)."""
    true = [class_id_from_filename(p.name) for p in paths]
    unnamed = [p.name for p, t in zip(paths, true) if t is None]
    unknown = [p.name for p, t in zip(paths, true) if t is not None and t not in id2label]
    for names, what in ((unnamed, "not named {class_id}_{n}.ext: left out of the accuracy"),
                        (unknown, "of a class id that id2label.json lacks: counted as wrong")):
        if names:
            print(f"note: {len(names)} image(s) {what}, e.g. {names[:3]}",
                  file=stream or sys.stderr)
    return true


def check_templates(templates):
    templates = list(templates)
    if not templates:
        raise ValueError("no prompt templates given")
    bad = [t for t in templates if not isinstance(t, str) or PLACEHOLDER not in t]
    if bad:
        raise ValueError(f"prompt templates without the placeholder {PLACEHOLDER}: {bad}")
    return templates


def format_prompt(template, class_name):
    return template.replace(PLACEHOLDER, class_name.replace("_", " "))


def template_slug(template):
    """A metric-friendly name: 'No {object}, no score.' -> 'no_object_no_score'."""
    return re.sub(r"[^a-z0-9]+", "_", template.lower()).strip("_") or "template"


def _model_device(model):
    return next(model.parameters()).device


@torch.no_grad()
def class_text_embeddings(model, class_names, templates, batch_size=256):
    """Tensor[C, D] of unit rows; several templates are ensembled (mean of unit vectors, renormed)."""
    templates = check_templates(templates)
    prompts = [format_prompt(t, n) for t in templates for n in class_names]
    tokens = clip.tokenize(prompts, context_length=model.context_length, truncate=True)
    device = _model_device(model)
    emb = torch.cat([model.encode_text(tokens[i:i + batch_size].to(device)).float()
                     for i in range(0, len(prompts), batch_size)])
    emb = F.normalize(emb, dim=-1).view(len(templates), len(class_names), -1)
    return F.normalize(emb.mean(0), dim=-1)


@torch.no_grad()
def image_embeddings(model, images):
    """Tensor[B, D] of unit rows for preprocessed images [B, 3, H, W]."""
    return F.normalize(model.encode_image(images.to(_model_device(model))).float(), dim=-1)


@torch.no_grad()
def probs_from_embeddings(model, image_emb, text_emb):
    logits = model.logit_scale.exp().item() * image_emb.to(text_emb.device) @ text_emb.T
    return logits.softmax(dim=-1)


def predict_probs(model, images, text_emb):
    """Tensor[B, C]: softmax over classes of logit_scale * cosine(image, class text)."""
    return probs_from_embeddings(model, image_embeddings(model, images), text_emb)


@dataclass
class FolderEmbeddings:
    paths: list          # readable images, in folder order
    emb: torch.Tensor    # [len(paths), D] unit rows
    skipped: list        # ImageReadError for each unreadable file


def embed_images(model, preprocess, paths, batch_size=64, num_workers=0, desc="images"):
    """Embed every readable image of `paths` in batches (progress bar); report unreadable ones
    (one stderr line each) and leave them out."""
    paths = list(paths)
    kept, embs, skipped = [], [], []
    loader = image_loader(paths, preprocess, batch_size=batch_size, num_workers=num_workers)
    # disable=None: no bar when stderr is not a terminal, so a log holds only the skip lines
    with tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr, disable=None) as bar:
        for batch in loader:
            for err in batch.errors:
                report_skip(err)
            skipped.extend(batch.errors)
            if batch.pixels is not None:
                embs.append(image_embeddings(model, batch.pixels).cpu())
                kept.extend(paths[i] for i in batch.indices)
            bar.update(len(batch.indices) + len(batch.errors))
    emb = torch.cat(embs) if embs else torch.empty(0, model.text_projection.shape[1])
    return FolderEmbeddings(kept, emb, skipped)


@dataclass
class Scores:
    accuracy: float
    n: int                       # images with a label
    per_class: list              # [{"id", "name", "n", "correct", "accuracy"}]
    confused_pairs: list         # [{"true", "true_name", "pred", "pred_name", "count"}] most first


def score(pred_ids, true_ids, id2label, n_pairs=10):
    """Accuracy, per-class accuracy and most confused (true -> predicted) pairs over the items
    whose true id is known (None entries are left out)."""
    pairs = [(t, p) for t, p in zip(true_ids, pred_ids) if t is not None]
    n = len(pairs)
    correct = sum(t == p for t, p in pairs)
    per_class = []
    for cid, name in id2label.items():
        mine = [p for t, p in pairs if t == cid]
        ok = sum(p == cid for p in mine)
        per_class.append(dict(id=cid, name=name, n=len(mine), correct=ok,
                              accuracy=ok / len(mine) if mine else None))
    confusions = Counter((t, p) for t, p in pairs if t != p)
    confused = [dict(true=t, true_name=id2label.get(t, "?"), pred=p, pred_name=id2label.get(p, "?"),
                     count=c)
                for (t, p), c in sorted(confusions.items(), key=lambda kv: (-kv[1], kv[0]))[:n_pairs]]
    return Scores(correct / n if n else float("nan"), n, per_class, confused)


def confident_examples(probs, pred, true, k):
    """(successes, failures): the rows of the `k` most confident right predictions and of the `k`
    most confident wrong ones, among the labelled images (true label not None)."""
    confidence = probs.max(dim=-1).values.tolist()
    labelled = [i for i, t in enumerate(true) if t is not None]
    ranked = sorted(labelled, key=lambda i: (-confidence[i], i))
    return ([i for i in ranked if pred[i] == true[i]][:k],
            [i for i in ranked if pred[i] != true[i]][:k])


def top_k(probs_row, id2label, k=5):
    """[(class id, name, probability)] of the k most probable classes, most probable first."""
    ids = list(id2label)
    p, idx = probs_row.topk(min(k, len(ids)))
    return [(ids[i], id2label[ids[i]], float(v)) for v, i in zip(p.tolist(), idx.tolist())]


def write_predictions_csv(path, filenames, label_ids):
    """CSV `filename,label` (atomic). Filenames are written verbatim, quoted by csv if needed;
    a name that is not valid UTF-8 keeps its original bytes (surrogateescape)."""
    with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for name, label in zip(filenames, label_ids):
            w.writerow([name, label])


@torch.no_grad()
def classify(model, folder_emb, id2label, templates):
    """(predicted class ids, probs [N, C]) for embedded images, with `templates` as the prompt
    (several templates = ensemble). Column j of probs is the j-th id of id2label."""
    text = class_text_embeddings(model, list(id2label.values()), templates)
    probs = probs_from_embeddings(model, folder_emb.emb, text.cpu())
    ids = list(id2label)
    return [ids[j] for j in probs.argmax(dim=-1).tolist()], probs


# ---- figures (matplotlib, Agg) -------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def plot_template_accuracy(path, rows, chance=None, highlight=None):
    """Horizontal bars: rows = [(label, accuracy)], best at the top; `highlight` label in orange."""
    plt = _plt()
    rows = sorted(rows, key=lambda r: r[1])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    colors = ["tab:orange" if label == highlight else "tab:blue" for label, _ in rows]
    bars = ax.barh(range(len(rows)), [a for _, a in rows], color=colors)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    for b, (_, a) in zip(bars, rows):
        ax.text(b.get_width() + 0.005, b.get_y() + b.get_height() / 2, f"{a:.3f}", va="center")
    if chance is not None:
        ax.axvline(chance, color="gray", ls="--", lw=1, label=f"chance {chance:.3f}")
        ax.legend(loc="lower right")
    ax.set_xlim(0, min(1.0, max(a for _, a in rows) + 0.12))
    ax.set_xlabel("zero-shot accuracy")
    ax.set_title("CLIP zero-shot accuracy per prompt template")
    _save(fig, path)


def plot_top5(path, image, filename, top5, true_id=None, true_name=None):
    """The image beside a bar chart of its five most probable classes (true class in green)."""
    plt = _plt()
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained",
                                 gridspec_kw=dict(width_ratios=[1, 1.6]))
    a0.imshow(image)
    a0.set_axis_off()
    a0.set_title(filename + (f"\ntrue: {true_name}" if true_name else ""), fontsize=9)
    labels = [f"{name} ({cid})" for cid, name, _ in top5][::-1]
    probs = [p for _, _, p in top5][::-1]
    colors = ["tab:green" if cid == true_id else "tab:gray" for cid, _, _ in top5][::-1]
    a1.barh(range(len(top5)), probs, color=colors)
    a1.set_yticks(range(len(top5)), labels)
    a1.set_xlim(0, 1)
    a1.set_xlabel("probability")
    a1.set_title("top-5" + ("" if true_id is None else " (green = true class)"), fontsize=9)
    _save(fig, path)


def plot_per_class(path, per_class):
    """Per-class accuracy, best at the top."""
    plt = _plt()
    rows = sorted((r for r in per_class if r["n"]), key=lambda r: (r["accuracy"], r["name"]))
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["accuracy"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [f"{r['name']} ({r['n']})" for r in rows], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title("per-class zero-shot accuracy (images per class)")
    _save(fig, path)


def plot_confusion(path, pred_ids, true_ids, id2label):
    """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
    plt = _plt()
    ids = list(id2label)
    pos = {c: i for i, c in enumerate(ids)}
    m = torch.zeros(len(ids), len(ids))
    for t, p in zip(true_ids, pred_ids):
        if t in pos and p in pos:
            m[pos[t], pos[p]] += 1
    m = m / m.sum(1, keepdim=True).clamp(min=1)
    size = max(4, 0.16 * len(ids) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=1)
    names = [id2label[c] for c in ids]
    fs = 7 if len(ids) <= 30 else 5
    ax.set_xticks(range(len(ids)), names, rotation=90, fontsize=fs)
    ax.set_yticks(range(len(ids)), names, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion (row-normalised)")
    _save(fig, path)
