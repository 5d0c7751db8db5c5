"""evaluation/scoring.py and stages/score.py against independent computations on the same files:
pycocoevalcap's PTBTokenizer + Cider/Bleu/Rouge called directly the way p2_evaluate.py's library does,
and the CLIPScore formula written out per image the way p2_evaluate.py does it."""
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from evaluation import scoring
from evaluation.clip_io import load_clip
from common.errors import InputError
from tests.tiny_world import world_section

CAPTIONS = {  # name -> references; the colours are what the tiny JPEGs show
    "000001": ["A red circle on the left.", "a red round shape at the left side",
               "One red circle, left."],
    "000002": ["Two blue squares next to each other", "a pair of blue squares",
               "blue squares, two of them, side by side"],
    "000003": ["a small green triangle in the middle", "A green triangle at the centre.",
               "the middle holds a small green triangle"],
    "000004": ["a yellow star above a red circle", "A yellow star is on top of a red circle",
               "red circle under a yellow star"],
    "000005": ["a purple square in the top right corner", "top right: one purple square",
               "A purple square, top right."],
}
COLOURS = {"000001": (200, 30, 30), "000002": (30, 30, 200), "000003": (30, 180, 30),
           "000004": (220, 220, 40), "000005": (140, 40, 160)}
PREDICTIONS = {
    "000001": "a red circle on the left",
    "000002": "two blue squares side by side.",
    "000003": "a green triangle in the middle",
    "000004": "a red circle below a yellow star",
    "000005": "a purple circle in the top left corner",
}


def write_references(path, captions):
    images, anns = [], []
    for i, (name, caps) in enumerate(captions.items()):
        images.append({"file_name": f"{name}.jpg", "id": 100 + i})
        for cap in caps:
            anns.append({"caption": cap, "image_id": 100 + i, "id": len(anns)})
    path.write_text(json.dumps({"images": images, "annotations": anns}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("scoring")
    p2 = root / "hw3_data" / "p2_data"
    (p2 / "images" / "val").mkdir(parents=True)
    write_references(p2 / "val.json", CAPTIONS)
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        arr = np.clip(np.array(colour) + rng.integers(-40, 40, (40, 48, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(p2 / "images" / "val" / f"{name}.jpg")
    # a tiny random CLIP in the real file format (a state dict); widths are multiples of 64
    from clip.model import CLIP
    model = CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
                 vision_patch_size=16, context_length=77, vocab_size=49408,
                 transformer_width=64, transformer_heads=1, transformer_layers=1)
    torch.save(model.state_dict(), root / "clip_tiny.pt")
    (root / "pred.json").write_text(json.dumps(PREDICTIONS))
    return root


@pytest.fixture(scope="module")
def clip_model(world):
    return load_clip(world / "clip_tiny.pt", "cpu")


def independent_coco(pred_file, ref_file, scorer):
    """pycocoevalcap called directly, as p2_evaluate.py's language_evaluation does."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = json.load(open(ref_file))
    id2name = {im["id"]: im["file_name"].replace(".jpg", "") for im in data["images"]}
    refs = {}
    for a in data["annotations"]:
        refs.setdefault(id2name[a["image_id"]], []).append(a["caption"])
    preds = json.load(open(pred_file))
    gts = {n: [{"caption": c} for c in refs[n]] for n in preds}
    res = {n: [{"caption": preds[n]}] for n in preds}
    tok = PTBTokenizer()
    return scorer.compute_score(tok.tokenize(gts), tok.tokenize(res))


def p2_evaluate_clipscore(pred_file, images_root, model, preprocess):
    """The course's CLIPScore loop: one image at a time, clip.tokenize(caption), 2.5 * max(cos, 0)."""
    import clip

    preds = json.load(open(pred_file))
    cossim = torch.nn.CosineSimilarity()
    scores = {}
    for name, caption in preds.items():
        image = Image.open(os.path.join(images_root, f"{name}.jpg")).convert("RGB")
        image = preprocess(image).unsqueeze(0)
        text = clip.tokenize(caption)
        with torch.no_grad():
            s = 2.5 * max(cossim(model.encode_image(image), model.encode_text(text)), 0)
        scores[name] = float(s)
    return sum(scores.values()) / len(scores), scores


def test_ngram_metrics_match_pycocoevalcap(world):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ref_file, pred_file = world / "hw3_data/p2_data/val.json", world / "pred.json"
    refs = scoring.load_references(ref_file)
    preds = scoring.load_predictions(pred_file, refs)
    summary, per_image = scoring.score_captions(
        preds, refs, metrics=("cider", "bleu4", "rougeL"))
    assert summary["n_images"] == 5

    cider, cider_each = independent_coco(pred_file, ref_file, Cider())
    assert abs(summary["cider"] - cider) < 1e-6
    for n, s in zip(preds, cider_each):
        assert abs(per_image[n]["cider"] - s) < 1e-6
    bleu, bleu_each = independent_coco(pred_file, ref_file, Bleu(4))
    assert abs(summary["bleu4"] - bleu[3]) < 1e-6
    assert all(abs(per_image[n]["bleu4"] - s) < 1e-6 for n, s in zip(preds, bleu_each[3]))
    rouge, rouge_each = independent_coco(pred_file, ref_file, Rouge())
    assert abs(summary["rougeL"] - rouge) < 1e-6
    assert all(abs(per_image[n]["rougeL"] - s) < 1e-6 for n, s in zip(preds, rouge_each))


def test_cider_reproduces_the_course_evaluator_readme():
    # p2_evaluate.py scores with language_evaluation.CocoEvaluator (bckim92/language-evaluation).
    # Its README (the version with RougeEvaluator(num_parallel_calls=5)) prints these numbers for
    # these strings. The earlier README's CIDEr 6.3085 came from a character-level join the
    # library has since dropped: a scorer that still joins characters fails here.
    preds = {"a": "i am a boy", "b": "she is a girl"}
    refs = {"a": ["am i a boy ?"], "b": ["is she a girl ?"]}
    summary, _ = scoring.score_captions(preds, refs, metrics=("cider", "bleu4", "rougeL"))
    assert abs(summary["cider"] - 3.333333333333333) < 1e-9
    assert abs(summary["bleu4"] - 1.4287202142987477e-08) < 1e-15
    assert abs(summary["rougeL"] - 0.75) < 1e-9


def test_exact_reference_beats_wrong_caption(world):
    refs = scoring.load_references(world / "hw3_data/p2_data/val.json")
    good = {n: caps[0] for n, caps in refs.items()}
    bad = dict(good, **{"000003": "two purple stars under a blue square"})
    _, per_good = scoring.score_captions(good, refs, metrics=("cider", "bleu4", "rougeL"))
    _, per_bad = scoring.score_captions(bad, refs, metrics=("cider", "bleu4", "rougeL"))
    for m in ("cider", "bleu4", "rougeL"):
        assert per_good["000003"][m] > per_bad["000003"][m]
    assert per_bad["000003"]["cider"] < 0.1


def test_tokenizer_matches_pycocoevalcap_on_awkward_text():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = ["A man's \"quoted\" DOG -- (big)!", "", "multi\nline caption", "café, naïve; 3.5 m",
            "... ? !", "don't stop", "a cat."]
    ours = scoring.ptb_tokenize(caps)
    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    assert ours == [theirs[i][0] for i in range(len(caps))]
    # other line ends stay inside their caption (pycocoevalcap replaces only "\n" and misaligns)
    odd = ["a\rb", "c\u2028d\x85e", "f\x0bg\x0ch", "last one"]
    assert scoring.ptb_tokenize(odd) == ["a b", "c d e", "f g h", "last one"]


def test_clipscore_matches_course_formula(world, clip_model):
    model, preprocess = clip_model
    refs = scoring.load_references(world / "hw3_data/p2_data/val.json")
    images = world / "hw3_data/p2_data/images/val"
    summary, per_image = scoring.score_captions(PREDICTIONS, refs, model, preprocess, images,
                                                metrics=("clipscore",), batch_size=2,
                                                progress=False)
    mean, each = p2_evaluate_clipscore(world / "pred.json", images, model, preprocess)
    assert abs(summary["clipscore"] - mean) < 1e-6
    for n in PREDICTIONS:
        assert abs(per_image[n]["clipscore"] - each[n]) < 1e-6
    assert any(v > 0 for v in each.values())

    # precomputed embeddings (as the extract stage stores them) give the same numbers
    feats = scoring.clip_image_features(model, preprocess, images, list(PREDICTIONS),
                                        progress=False).numpy()
    for emb in ({n: f for n, f in zip(PREDICTIONS, feats)},
                (feats[::-1].copy(), [n.encode() for n in reversed(list(PREDICTIONS))])):
        s, _ = scoring.score_captions(PREDICTIONS, refs, model, embeddings=emb,
                                      metrics=("clipscore",))
        assert abs(s["clipscore"] - mean) < 1e-6


def test_clipscore_clips_at_zero(clip_model):
    model, _ = clip_model
    preds = {"a": "a red circle", "b": "two blue squares"}
    text = scoring.clip_text_features(model, preds, ["a", "b"])
    emb = {"a": 3.0 * text[0].numpy(), "b": -text[1].numpy()}   # cos = +1 and -1
    mean, each = scoring.clipscore(preds, model, embeddings=emb)
    assert abs(each["a"] - 2.5) < 1e-5
    assert each["b"] == 0.0
    assert abs(mean - 1.25) < 1e-5


def test_overlong_caption_names_the_image(clip_model):
    model, _ = clip_model
    preds = {"ok": "a red circle", "long_one": "red " * 80}
    with pytest.raises(ValueError, match="long_one.*context length 77"):
        scoring.clipscore(preds, model, embeddings={"ok": np.ones(32), "long_one": np.ones(32)})


def test_bad_references_name_the_file(tmp_path):
    p = tmp_path / "val.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match=f"{p}.*not valid JSON"):
        scoring.load_references(p)
    p.write_text(json.dumps({"images": [{"file_name": "x.jpg"}], "annotations": []}))
    with pytest.raises(ValueError, match=rf"{p}.*images\[0\] lacks"):
        scoring.load_references(p)
    p.write_text(json.dumps({"images": [{"file_name": "x.jpg", "id": 1}],
                             "annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match=rf"{p}.*annotations\[0\] lacks"):
        scoring.load_references(p)
    write_references(p, {"x": ["a cat"], "y": []})
    with pytest.raises(ValueError, match=f"{p}.*1 image.*no caption.*'y'"):
        scoring.load_references(p)
    write_references(p, {"x": ["a cat"], "y": ["a dog", "  "]})
    with pytest.raises(ValueError, match=rf"{p}.*annotations\[2\].*'y'.*empty caption"):
        scoring.load_references(p)
    with pytest.raises(InputError, match="nowhere.json: references file not found"):
        scoring.load_references(tmp_path / "nowhere.json")


def test_bad_predictions_name_the_file(tmp_path):
    refs = {"x": ["a cat"], "y": ["a dog"]}
    p = tmp_path / "pred.json"
    for content, message in [("[1, 2]", "expected a JSON object"),
                             (json.dumps({"x": "a cat", "y": 3}), "not strings.*'y'"),
                             (json.dumps({"x": "a", "y": "b", "z.jpg": "c"}), "not in the references.*'z.jpg'"),
                             (json.dumps({"x": "a cat"}), "no prediction.*'y'"),
                             ("{", "not valid JSON")]:
        p.write_text(content)
        with pytest.raises(ValueError, match=f"{p}.*{message}"):
            scoring.load_predictions(p, refs)
    p.write_text(json.dumps({"x": "a cat"}))
    assert scoring.load_predictions(p, refs, allow_subset=True) == {"x": "a cat"}


def test_missing_image_and_missing_java_are_clear(world, clip_model, monkeypatch, tmp_path):
    model, preprocess = clip_model
    with pytest.raises(FileNotFoundError, match="not found.*zzz.jpg"):
        scoring.clipscore({"zzz": "a cat"}, model, preprocess, world / "hw3_data")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    with pytest.raises(InputError, match="broken.jpg: cannot read image"):
        scoring.clipscore({"broken": "a cat"}, model, preprocess, tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="Java is required for PTBTokenizer: install a JRE"):
        scoring.score_captions({"x": "a cat"}, {"x": ["a cat"]}, metrics=("cider",))


def test_stage_writes_outputs_with_meteor(world, monkeypatch):
    """The score stage end to end with every default metric. METEOR runs only here (one JVM start,
    6-20 s): it is pycocoevalcap's Meteor on the tokens checked above, so we check its properties."""
    from stages import score as stage

    preds = dict(PREDICTIONS, **{"000002": CAPTIONS["000002"][1],       # an exact reference
                                 "000005": "zebras eat grass quickly"})  # nothing right
    run = world / "run"
    (run / "predictions" / "lora").mkdir(parents=True)
    (run / "predictions" / "lora" / "val.json").write_text(json.dumps(preds))
    # the blind baseline: every image given another image's caption
    names = sorted(preds)
    blind = {n: preds[names[(i + 1) % len(names)]] for i, n in enumerate(names)}
    (run / "predictions" / "lora" / "val_blind.json").write_text(json.dumps(blind))
    params = {"world": world_section(world / "hw3_data", world / "clip_tiny.pt"),
              "score": {"metrics": list(scoring.METRICS), "batch_size": 4}}
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(run)
    stage.main(["--variant", "lora"])

    metrics = json.loads((run / "metrics" / "lora.json").read_text())
    assert set(metrics) == {"cider", "clipscore", "bleu4", "meteor", "rougeL", "n_images",
                            "cider_blind"}
    assert metrics["cider_blind"] < metrics["cider"]
    assert metrics["n_images"] == 5
    per_image = json.loads((run / "predictions" / "lora" / "val_scores.json").read_text())
    assert set(per_image) == set(preds)
    assert per_image["000001"]["caption"] == preds["000001"]
    for m in ("cider", "clipscore", "rougeL"):   # BLEU and METEOR are corpus-level, not means
        assert abs(np.mean([v[m] for v in per_image.values()]) - metrics[m]) < 1e-6, m
    assert not [f for f in os.listdir(run / "metrics") if f.startswith(".tmp")]
    assert per_image["000002"]["meteor"] > 0.9 and per_image["000005"]["meteor"] < 0.2
    assert 0 < metrics["meteor"] < 1


def test_stage_with_extracted_embeddings(world, monkeypatch):
    """score.image_embeddings: the extract stage's clipscore_<split>.h5 gives the image path's numbers."""
    from evaluation.features import write_clip_embeddings
    from stages import score as stage

    model, preprocess = load_clip(world / "clip_tiny.pt", "cpu")
    images = world / "hw3_data/p2_data/images/val"
    run = world / "run_emb"
    (run / "predictions" / "adapter").mkdir(parents=True)
    (run / "predictions" / "adapter" / "val.json").write_text(json.dumps(PREDICTIONS))
    (run / "predictions" / "adapter" / "val_blind.json").write_text(json.dumps(PREDICTIONS))
    from evaluation.encoders import EncoderConfig, encoder_id
    made_by = encoder_id(EncoderConfig(kind="clip", name=str(world / "clip_tiny.pt")))
    for name, model_id in (("clipscore_val.h5", made_by), ("other_clip.h5", "another CLIP")):
        write_clip_embeddings(run / name, model, preprocess, sorted(images.glob("*.jpg")), model_id)
    world_params = world_section(world / "hw3_data", world / "clip_tiny.pt")
    monkeypatch.chdir(run)
    results = []
    for emb in (None, "clipscore_val.h5"):
        (run / "params.yaml").write_text(yaml.safe_dump({"world": world_params, "score": {
            "metrics": ["clipscore", "cider"], "image_embeddings": emb}}))
        stage.main(["--variant", "adapter"])
        results.append(json.loads((run / "metrics" / "adapter.json").read_text()))
    assert list(results[0]) == ["clipscore", "cider", "n_images", "cider_blind"]
    assert abs(results[0]["clipscore"] - results[1]["clipscore"]) < 1e-6
    assert results[0]["cider"] == results[1]["cider"]
    # embeddings made by another CLIP than the scoring one are refused, naming the file
    (run / "params.yaml").write_text(yaml.safe_dump({"world": world_params, "score": {
        "metrics": ["clipscore", "cider"], "image_embeddings": "other_clip.h5"}}))
    from evaluation.features import FeatureFileError
    with pytest.raises(FeatureFileError, match=r"other_clip\.h5: made by CLIP another CLIP"):
        stage.main(["--variant", "adapter"])
