"""Caption scores for Problem 2: CIDEr and CLIPScore as the course computes them, plus BLEU-4,
METEOR and ROUGE-L from coco-caption (pycocoevalcap).

- CIDEr (`cider`): coco-caption CIDEr-D (n=4, sigma=6) over PTBTokenizer output (Java; lower-cased,
  punctuation dropped) of the predictions and all references of the scored images; document
  frequencies come from those references. This is what the course's p2_evaluate.py prints: it
  calls `language_evaluation.CocoEvaluator(coco_types=["CIDEr"]).run_evaluation(predicts, answers)`,
  which runs the same PTBTokenizer and Cider on the plain strings. (Early versions of that library
  first did `' '.join(caption)`, counting character n-grams: its README then gave CIDEr 6.3085 for
  'i am a boy' vs 'am i a boy ?'. The version with `CocoEvaluator(tokenization_fn=...)` dropped the
  join and its README gives 3.3333, with BLEU-4 1.4287e-08: the numbers `cider` and `bleu4` give.)
- CLIPScore (`clipscore`): per image 2.5 * max(cos(image_features, text_features), 0) with the CLIP
  model's own preprocess and `clip.tokenize(caption)` (never truncated: a caption that does not fit
  raises, naming the image), averaged over images. (The course's code crashes rather than clip: its
  `max(cos, 0)` returns the int 0 and `.squeeze()` fails; with a trained CLIP cosines stay > 0.)
  Image features come from the JPEGs (opened and converted exactly as the course does) or from
  precomputed embeddings, e.g. the extract stage's features/clipscore_<split>.h5; those are read
  with EXIF orientation applied (common/imageio.py), which the course does not do.
- `bleu4` (Bleu(4), Bleu_4), `meteor` (Meteor 1.5; starts a JVM, ~6 s), `rougeL` (Rouge) on the same
  PTB tokens as `cider`, like coco-caption's COCOEvalCap.
- SPICE is left out: it needs Stanford CoreNLP models that pycocoevalcap downloads on first use, and
  no network is reachable here.

PTBTokenizer: we run pycocoevalcap's own jar with its own command line and punctuation list, but
write the input to the system temp folder (pycocoevalcap writes into its package folder, which may
be read-only or shared by concurrent runs) and check Java's exit status and the number of lines it
returns (pycocoevalcap silently mis-aligns captions otherwise). tests/test_scoring.py checks the
result against pycocoevalcap's PTBTokenizer itself.
"""
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import InputError, read_json
from common.imageio import DECODE_ERRORS, ImageReadError

METRICS = ("cider", "clipscore", "bleu4", "meteor", "rougeL")
CLIPSCORE_WEIGHT = 2.5

# Characters Java reads as line ends: each would split a caption over two PTBTokenizer lines.
LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _some(names, k=5):
    names = sorted(names)
    more = f" (and {len(names) - k} more)" if len(names) > k else ""
    return ", ".join(repr(n) for n in names[:k]) + more


# ----------------------------------------------------------------------------- inputs

class CaptionFileError(InputError, ValueError):
    """A references or predictions file (or dict) that cannot be scored; str() names it."""


def load_references(path):
    """COCO-style captions file -> {file name without extension: [caption, ...]}, in file order."""
    data = read_json(path, "references file not found", CaptionFileError)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise CaptionFileError(f"{path}: expected an object with 'images' and 'annotations' lists")
    if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
        raise CaptionFileError(f"{path}: 'images' and 'annotations' must be lists")
    id_to_name, refs = {}, {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "file_name" not in img or "id" not in img:
            raise CaptionFileError(f"{path}: images[{i}] lacks 'file_name' or 'id': {img!r}")
        if not isinstance(img["file_name"], str):
            raise CaptionFileError(f"{path}: images[{i}].file_name is not a string: "
                                   f"{img['file_name']!r}")
        name = os.path.splitext(img["file_name"])[0]
        if img["id"] in id_to_name:
            raise CaptionFileError(f"{path}: image id {img['id']!r} appears twice in 'images'")
        if name in refs:
            raise CaptionFileError(f"{path}: file name {img['file_name']!r} appears twice in "
                                   "'images'")
        id_to_name[img["id"]] = name
        refs[name] = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "caption" not in ann or "image_id" not in ann:
            raise CaptionFileError(f"{path}: annotations[{i}] lacks 'caption' or 'image_id': "
                                   f"{ann!r}")
        if not isinstance(ann["caption"], str):
            raise CaptionFileError(f"{path}: annotations[{i}].caption is not a string: "
                                   f"{ann['caption']!r}")
        if ann["image_id"] not in id_to_name:
            raise CaptionFileError(f"{path}: annotations[{i}] refers to image_id "
                                   f"{ann['image_id']!r}, which is not in 'images'")
        if not ann["caption"].strip():
            raise CaptionFileError(f"{path}: annotations[{i}] (image "
                                   f"{id_to_name[ann['image_id']]!r}) has an empty caption")
        refs[id_to_name[ann["image_id"]]].append(ann["caption"])
    empty = [n for n, caps in refs.items() if not caps]
    if empty:
        raise CaptionFileError(f"{path}: {len(empty)} image(s) have no caption: {_some(empty)}")
    if not refs:
        raise CaptionFileError(f"{path}: no images")
    return refs


def check_predictions(predictions, references, source="predictions", allow_subset=False):
    """Raise a clear error unless `predictions` is {name: str} over names in `references`.

    With allow_subset=False (the course's rule) every reference image must have a prediction.
    """
    if not isinstance(predictions, Mapping):
        raise CaptionFileError(f"{source}: expected a JSON object {{image name: caption}}, "
                               f"got {type(predictions).__name__}")
    if not predictions:
        raise CaptionFileError(f"{source}: no predictions")
    bad = [k for k, v in predictions.items() if not isinstance(v, str)]
    if bad:
        raise CaptionFileError(f"{source}: {len(bad)} caption(s) are not strings: {_some(bad)}")
    unknown = set(predictions) - set(references)
    if unknown:
        raise CaptionFileError(f"{source}: {len(unknown)} image name(s) are not in the references "
                               f"(names are file names without extension): {_some(unknown)}")
    if not allow_subset:
        missing = set(references) - set(predictions)
        if missing:
            raise CaptionFileError(f"{source}: {len(missing)} reference image(s) have no "
                                   f"prediction: {_some(missing)}")


def load_predictions(path, references=None, allow_subset=False):
    """Predictions JSON {name without extension: caption} -> dict; checked against references."""
    preds = read_json(path, "predictions file not found", CaptionFileError)
    if references is None:
        references = preds if isinstance(preds, Mapping) else {}
    check_predictions(preds, references, source=str(path), allow_subset=allow_subset)
    return preds


# ----------------------------------------------------------------------------- PTB tokenizer

def ptb_tokenize(sentences):
    """pycocoevalcap's PTBTokenizer over a list of sentences -> list of tokenized strings."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    if not sentences:
        return []
    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("Java is required for PTBTokenizer: install a JRE "
                           "(e.g. apt-get install default-jre-headless)")
    text = "\n".join(LINE_BREAKS.sub(" ", s) for s in sentences)
    fd, tmp = tempfile.mkstemp(prefix="ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True)
        except OSError as e:
            raise RuntimeError(f"Java is required for PTBTokenizer: install a JRE ({e})") from None
    finally:
        os.unlink(tmp)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer (Java) failed with exit status {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    lines = proc.stdout.decode().split("\n")
    if len(lines) == len(sentences) + 1 and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) != len(sentences):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} "
                           "captions (a caption holds a character Java reads as a line break?)")
    punct = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in lines]


def _tokenize_grouped(groups):
    """{key: [caption, ...]} -> {key: [tokenized caption, ...]} with one Java run."""
    flat = [c for caps in groups.values() for c in caps]
    toks = iter(ptb_tokenize(flat))
    return {k: [next(toks) for _ in caps] for k, caps in groups.items()}


def tokenize_pair(predictions, references, names):
    """Tokenize as coco-caption does (references and predictions in separate runs).

    Returns (gts, res): {name: [tokens of each reference]}, {name: [tokens of the prediction]}.
    """
    gts = _tokenize_grouped({n: references[n] for n in names})
    res = _tokenize_grouped({n: [predictions[n]] for n in names})
    return gts, res


# ----------------------------------------------------------------------------- n-gram metrics

def cider(gts, res):
    """CIDEr-D over tokenized dicts -> (corpus score, {name: score})."""
    from pycocoevalcap.cider.cider import Cider

    score, scores = Cider().compute_score(gts, res)
    return float(score), {n: float(s) for n, s in zip(gts, scores)}


def bleu4(gts, res):
    from pycocoevalcap.bleu.bleu import Bleu

    score, scores = Bleu(4).compute_score(gts, res, verbose=0)
    return float(score[3]), {n: float(s) for n, s in zip(gts, scores[3])}


def rouge_l(gts, res):
    from pycocoevalcap.rouge.rouge import Rouge

    score, scores = Rouge().compute_score(gts, res)
    return float(score), {n: float(s) for n, s in zip(gts, scores)}


def meteor(gts, res):
    """METEOR 1.5 through pycocoevalcap's JVM wrapper (slow to start: ~6 s)."""
    from pycocoevalcap.meteor.meteor import Meteor

    if shutil.which("java") is None:
        raise RuntimeError("Java is required for METEOR: install a JRE")
    scorer = Meteor()
    try:
        score, scores = scorer.compute_score(gts, res)
    except (ValueError, OSError) as e:  # the JVM died: empty reads, broken pipe
        if scorer.lock.locked():
            scorer.lock.release()  # else Meteor.__del__ blocks forever on it
        err = ""
        if scorer.meteor_p.poll() is not None:
            err = scorer.meteor_p.stderr.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"METEOR (Java) failed: {e!r} {err}") from None
    return float(score), {n: float(s) for n, s in zip(gts, scores)}


# ----------------------------------------------------------------------------- CLIPScore

def _model_device(model):
    return next(model.parameters()).device


@torch.no_grad()
def clip_image_features(model, preprocess, images_root, names, batch_size=64, progress=True):
    """encode_image of images_root/{name}.jpg (opened and converted as the course does) -> [N, D]."""
    from PIL import Image

    device = _model_device(model)
    paths = [Path(images_root) / f"{n}.jpg" for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) not found for CLIPScore: {_some(missing)}")
    feats = []
    for i in tqdm(range(0, len(paths), batch_size), desc="CLIPScore images", disable=not progress):
        batch = []
        for p in paths[i:i + batch_size]:
            try:
                with Image.open(p) as im:
                    batch.append(preprocess(im.convert("RGB")))
            except DECODE_ERRORS as e:
                raise ImageReadError(p, f"cannot read image ({type(e).__name__}: {e})") from None
        feats.append(model.encode_image(torch.stack(batch).to(device)))
    return torch.cat(feats)


def tokenize_captions(model, captions, names):
    """clip.tokenize each caption without truncation; a caption that does not fit raises."""
    import clip

    context = getattr(model, "context_length", 77)
    rows = []
    for n in names:
        try:
            rows.append(clip.tokenize(captions[n], context_length=context))
        except RuntimeError:
            n_tok = len(clip.clip._tokenizer.encode(captions[n])) + 2
            raise ValueError(f"caption of image {n!r} is {n_tok} CLIP tokens, over the context "
                             f"length {context} (the course's clip.tokenize would crash on it): "
                             f"{captions[n]!r}") from None
    return torch.cat(rows)


@torch.no_grad()
def clip_text_features(model, captions, names, batch_size=256):
    device = _model_device(model)
    tokens = tokenize_captions(model, captions, names)
    return torch.cat([model.encode_text(tokens[i:i + batch_size].to(device))
                      for i in range(0, len(tokens), batch_size)])


def embeddings_for(embeddings, names):
    """Precomputed image embeddings, as {name: vector} or (array [N, D], names), in `names` order."""
    if isinstance(embeddings, Mapping):
        table = embeddings
    elif isinstance(embeddings, (tuple, list)) and len(embeddings) == 2:
        array, emb_names = embeddings
        emb_names = [n.decode() if isinstance(n, bytes) else str(n) for n in emb_names]
        if len(emb_names) != len(array):
            raise ValueError(f"image embeddings: {len(array)} rows but {len(emb_names)} names")
        table = dict(zip(emb_names, array))
    else:
        raise TypeError("embeddings must be {name: vector} or (array, names)")
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"image embeddings missing for {len(missing)} image(s): {_some(missing)}")
    return torch.stack([torch.as_tensor(np.asarray(table[n])) for n in names])


def clipscore_from_features(image_features, text_features):
    """Per-row 2.5 * max(cos, 0), computed in the text features' dtype as the course does."""
    image_features = image_features.to(text_features.device, text_features.dtype)
    cos = F.cosine_similarity(image_features, text_features, dim=-1)
    return CLIPSCORE_WEIGHT * cos.clamp(min=0).float()


def clipscore(predictions, model, preprocess=None, images_root=None, embeddings=None,
              names=None, batch_size=64, progress=True):
    """Mean CLIPScore and {name: score}. Image features from images_root or from `embeddings`."""
    names = list(predictions) if names is None else list(names)
    text = clip_text_features(model, predictions, names)
    if embeddings is not None:
        image = embeddings_for(embeddings, names)
    elif images_root is not None and preprocess is not None:
        image = clip_image_features(model, preprocess, images_root, names, batch_size, progress)
    else:
        raise ValueError("CLIPScore needs images_root and preprocess, or precomputed embeddings")
    if image.shape[-1] != text.shape[-1]:
        raise ValueError(f"image embeddings are {image.shape[-1]}-d but the CLIP text features are "
                         f"{text.shape[-1]}-d: embeddings from another CLIP?")
    scores = clipscore_from_features(image, text).cpu().tolist()
    return float(np.mean(scores)), dict(zip(names, scores))


# ----------------------------------------------------------------------------- everything

def score_captions(predictions, references, clip_model=None, preprocess=None, images_root=None,
                   embeddings=None, metrics=METRICS, allow_subset=False, batch_size=64,
                   progress=True):
    """Score {name: caption} against {name: [reference, ...]}.

    n-gram metrics use the references of the predicted images only (with allow_subset=False, the
    course's rule, that is all of them). Returns (summary, per_image): summary {metric: value,
    "n_images": n}; per_image {name: {"caption": ..., metric: value, ...}}.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {list(METRICS)}")
    check_predictions(predictions, references, allow_subset=allow_subset)
    names = list(predictions)
    summary, per_image = {}, {n: {"caption": predictions[n]} for n in names}

    def keep(metric, result):
        summary[metric] = result[0]
        for n, s in result[1].items():
            per_image[n][metric] = s

    word = {"cider": cider, "bleu4": bleu4, "meteor": meteor, "rougeL": rouge_l}
    if any(m in word for m in metrics):
        gts, res = tokenize_pair(predictions, references, names)
        for m in metrics:
            if m in word:
                keep(m, word[m](gts, res))
    if "clipscore" in metrics:
        if clip_model is None:
            raise ValueError("metric 'clipscore' needs a CLIP model")
        keep("clipscore", clipscore(predictions, clip_model, preprocess, images_root, embeddings,
                                    names, batch_size, progress))
    summary = {m: summary[m] for m in metrics}
    summary["n_images"] = len(names)
    return summary, per_image
