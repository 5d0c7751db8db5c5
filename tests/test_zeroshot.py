"""CLIP loading, zero-shot math, the zeroshot stage and hw3_1.sh on a tiny random CLIP."""
import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from evaluation.clip_io import CheckpointError, clip, clip_config_from_state_dict, load_clip
from common.imageio import list_images
from evaluation import zeroshot as zs
from stages import hw3_1
from tests.hostile_images import READABLE, UNREADABLE, make_hostile_folder
from tests.tiny_world import world_section

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
            context_length=16, vocab_size=49408, transformer_width=64, transformer_heads=1,
            transformer_layers=1)
ID2LABEL = {"0": "red_square", "1": "blue circle", "2": "green triangle"}
TEMPLATES = ["This is a photo of {object}", "This is not a photo of {object}", "No {object}, no score.",
             "a photo of a {object}", "{object}"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = clip.model.CLIP(**TINY).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def p1(tmp_path_factory):
    """data_root/p1_data/{val/*.png, id2label.json} with 6 labelled images."""
    root = tmp_path_factory.mktemp("hw3_data")
    val = root / "p1_data" / "val"
    val.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for cls in range(3):
        for k in range(2):
            arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(val / f"{cls}_{k + 10 * cls}.png")
    (root / "p1_data" / "id2label.json").write_text(json.dumps(ID2LABEL))
    return root


def write_params(path, clip_path, data_root, **over):
    section = dict(clip=str(clip_path), data_root=str(data_root), templates=TEMPLATES,
                   ensemble=["a photo of a {object}.", "a drawing of the {object}.", "{object}"],
                   predict_with="ensemble", batch_size=4, num_workers=0, n_top5=2, seed=0, device="cpu")
    section.update(over)
    path.write_text(yaml.safe_dump({"zeroshot": section}))
    return path


# ---- load_clip --------------------------------------------------------------------------------

def test_load_clip_reloads_exactly(tiny):
    model, path = tiny
    loaded, preprocess = load_clip(path)
    assert clip_config_from_state_dict(model.state_dict()) == TINY
    sd = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v), k
    x = preprocess(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert x.shape == (3, 32, 32)
    assert not loaded.training


def _save_variant(tmp_path, tiny, name, edit):
    sd = {k: v.clone() for k, v in tiny[0].state_dict().items()}
    edit(sd)
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_bad_checkpoints_named(tmp_path, tiny):
    cases = [
        ("missing.pt", lambda sd: sd.pop("visual.ln_post.bias"), "missing keys: visual.ln_post.bias"),
        ("extra.pt", lambda sd: sd.__setitem__("head.weight", torch.zeros(2)), "unexpected keys: head.weight"),
        ("shape.pt", lambda sd: sd.__setitem__("visual.ln_post.bias", torch.zeros(7)),
         "visual.ln_post.bias (7,) != (64,)"),
        ("nottext.pt", lambda sd: sd.pop("text_projection"), "missing key 'text_projection'"),
    ]
    for name, edit, msg in cases:
        path = _save_variant(tmp_path, tiny, name, edit)
        with pytest.raises(CheckpointError) as e:
            load_clip(path)
        assert str(path) in str(e.value) and msg in str(e.value), str(e.value)

    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(tiny[1].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as e:
        load_clip(trunc)
    assert str(trunc) in str(e.value)

    with pytest.raises(CheckpointError, match="not a CLIP model name"):
        load_clip(tmp_path / "nope.pt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payload_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"visual.proj": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused") as e:
        load_clip(evil)
    assert str(evil) in str(e.value)
    assert not marker.exists()


def test_torchscript_detected(tmp_path, tiny):
    from evaluation.clip_io import _is_torchscript
    ts = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), ts)
    assert _is_torchscript(ts) and not _is_torchscript(tiny[1])


# ---- the maths --------------------------------------------------------------------------------

def test_text_embeddings_and_ensemble(tiny):
    model = tiny[0]
    names = ["red_square", "blue circle"]
    one = zs.class_text_embeddings(model, names, ["a photo of a {object}"])
    tokens = clip.tokenize(["a photo of a red square", "a photo of a blue circle"], context_length=16)
    with torch.no_grad():
        ref = F.normalize(model.encode_text(tokens), dim=-1)
    assert torch.allclose(one, ref, atol=1e-6)
    two = zs.class_text_embeddings(model, names, ["{object}"])
    ens = zs.class_text_embeddings(model, names, ["a photo of a {object}", "{object}"])
    assert torch.allclose(ens, F.normalize(one + two, dim=-1), atol=1e-6)
    assert torch.allclose(ens.norm(dim=-1), torch.ones(2), atol=1e-6)
    with pytest.raises(ValueError, match="placeholder"):
        zs.class_text_embeddings(model, names, ["a photo"])


def test_predict_probs(tiny):
    model = tiny[0]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    text = zs.class_text_embeddings(model, ["a", "b", "c", "d"], ["{object}"])
    probs = zs.predict_probs(model, images, text)
    with torch.no_grad():
        img = F.normalize(model.encode_image(images), dim=-1)
    assert torch.allclose(probs, (model.logit_scale.exp() * img @ text.T).softmax(-1), atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-6)


def test_score_and_filenames():
    id2label = {0: "a", 1: "b", 2: "c", 3: "d"}
    sc = zs.score([0, 1, 1, 2, 1], [0, 2, 1, 2, None], id2label)
    assert sc.n == 4 and sc.accuracy == 0.75
    assert [r["accuracy"] for r in sc.per_class] == [1.0, 1.0, 0.5, None]
    assert sc.confused_pairs == [dict(true=2, true_name="c", pred=1, pred_name="b", count=1)]
    assert zs.class_id_from_filename("12_345.png") == 12
    assert zs.class_id_from_filename("photo 1.png") is None
    assert zs.template_slug("No {object}, no score.") == "no_object_no_score"


@pytest.mark.parametrize("content,msg", [
    ('["bicycle"]', "expected a JSON object"), ('{"a": "bicycle"}', "not a non-negative integer id"),
    ('{"0": ""}', "not a non-empty string"), ('{"0": 3}', "not a non-empty string"),
    ("{}", "empty"), ("{not json", "not valid JSON"), ('{"1": "x", "01": "y"}', "appears twice")])
def test_bad_id2label(tmp_path, content, msg):
    path = tmp_path / "id2label.json"
    path.write_text(content)
    with pytest.raises(zs.LabelMapError, match=msg) as e:
        zs.read_id2label(path)
    assert str(path) in str(e.value)


def test_id2label_sorted_ints(tmp_path):
    path = tmp_path / "id2label.json"
    path.write_text('{"10": "x", "2": "y"}')
    assert zs.read_id2label(path) == {2: "y", 10: "x"}


# ---- hw3_1.sh and the stage -------------------------------------------------------------------

def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def run_sh(*args):
    return subprocess.run(["bash", str(ROOT / "hw3_1.sh"), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)


def test_hw3_1_sh_hostile_folder(tmp_path, tiny, p1):
    model, clip_path = tiny
    folder = make_hostile_folder(tmp_path / "imgs dir")
    params = write_params(tmp_path / "params.yaml", clip_path, p1)
    out = tmp_path / "new" / "sub dir" / "out.csv"
    r = run_sh(folder, p1 / "p1_data" / "id2label.json", out, "--params", params)
    assert r.returncode == hw3_1.EXIT_SKIPPED, r.stderr
    for name in UNREADABLE:   # one stderr line naming each unreadable file
        assert sum(name in line for line in r.stderr.splitlines()) == 1, r.stderr
    header, rows = read_csv(out)
    assert header == ["filename", "label"]
    assert [name for name, _ in rows] == sorted(READABLE)   # exact names, subfolder not entered

    # the CSV equals the library's predictions
    cfg = zs.ZeroShotConfig.from_params(yaml.safe_load(params.read_text())["zeroshot"])
    loaded, preprocess = load_clip(clip_path)
    emb = zs.embed_images(loaded, preprocess, list_images(folder), batch_size=cfg.batch_size)
    pred, _ = zs.classify(loaded, emb, zs.read_id2label(p1 / "p1_data" / "id2label.json"),
                          cfg.prediction_templates())
    assert [int(label) for _, label in rows] == pred

    assert run_sh(folder).returncode == hw3_1.EXIT_USAGE


def test_hw3_1_fatal_inputs(tmp_path, tiny, p1, capsys):
    params = write_params(tmp_path / "params.yaml", tiny[1], p1)
    val, good_map = p1 / "p1_data" / "val", p1 / "p1_data" / "id2label.json"
    out = tmp_path / "out.csv"
    bad_map = tmp_path / "id2label.json"
    bad_map.write_text('["bicycle", "car"]')
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("1_1.png", "2_3.jpg"):
        (broken / name).write_bytes(b"not an image")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [((tmp_path / "missing dir", good_map, out), "missing dir: image folder does not exist"),
             ((val, bad_map, out), "id2label.json: expected a JSON object"),
             ((empty, good_map, out), "empty: no image files"),
             ((broken, good_map, out), "broken: none of its 2 image files could be read"),
             ((val, tmp_path / "none.json", out), "none.json: id2label file does not exist"),
             ((val, good_map, a_file / "out.csv"), "a_file is not a writable folder")]
    for (folder, id2label, out_path), msg in cases:
        assert hw3_1.main([str(folder), str(id2label), str(out_path), "--params", str(params)]) == 1
        assert msg in capsys.readouterr().err
        assert not out.exists()
    assert hw3_1.main([str(val), str(good_map), str(out), "--params", str(params)]) == 0
    header, rows = read_csv(out)
    assert [n for n, _ in rows] == sorted(p.name for p in val.iterdir())

    # an OUT_CSV that is an input is refused, and the input stays as it was
    images = tmp_path / "images"
    shutil.copytree(val, images)
    id2label = tmp_path / "id2label_copy.json"
    shutil.copy(good_map, id2label)
    for target in (id2label, sorted(images.iterdir())[0], tiny[1]):
        before = Path(target).read_bytes()
        assert hw3_1.main([str(images), str(id2label), str(target), "--params", str(params)]) == 1
        assert "is an input" in capsys.readouterr().err
        assert Path(target).read_bytes() == before
    assert hw3_1.main([str(val), str(good_map), str(out), "--params", str(params),
                       "--device", "gpu"]) == 1
    assert "--device 'gpu': not a device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        hw3_1.main([str(val), str(good_map), str(out), "--batch-size", "0"])
    assert usage.value.code == hw3_1.EXIT_USAGE

    # a file name that is not valid UTF-8 comes back with its exact bytes
    odd = tmp_path / "odd"
    odd.mkdir()
    name = os.fsdecode(b"caf\xe9 1.png")
    Image.new("RGB", (8, 8)).save(odd / name, format="PNG")
    assert hw3_1.main([str(odd), str(good_map), str(out), "--params", str(params)]) == 0
    assert out.read_bytes().splitlines()[1].startswith(b"caf\xe9 1.png,")


def test_zeroshot_stage(tmp_path, tiny, p1, monkeypatch):
    from stages import zeroshot as stage
    params = write_params(tmp_path / "params.yaml", tiny[1], p1)
    doc = yaml.safe_load(params.read_text())   # the data root may come from world.data_root
    doc["world"] = world_section(doc["zeroshot"].pop("data_root"), "unused.pt")
    params.write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(tmp_path)
    stage.main(["--params", str(params)])
    metrics = json.loads(Path("metrics/zeroshot.json").read_text())
    slugs = ["this_is_a_photo_of_object", "this_is_not_a_photo_of_object", "no_object_no_score",
             "a_photo_of_a_object", "object", "ensemble"]
    assert list(metrics["accuracy"]) == slugs
    assert metrics["n_images"] == metrics["n_labelled"] == 6
    for a in metrics["accuracy"].values():
        assert a * 6 == pytest.approx(round(a * 6))
    details = json.loads(Path("metrics/zeroshot_classes.json").read_text())
    right = round(metrics["predict_with_accuracy"] * 6)
    assert len(details["per_class"]) == 3 and len(details["top5"]) == min(2, right) + min(2, 6 - right)
    assert len(details["top5"][0]["top5"]) == 3   # only 3 classes
    assert [t["kind"] for t in details["top5"]].count("success") <= 2
    assert all((t["kind"] == "success") == (t["top5"][0]["id"] == t["true"]) for t in details["top5"])
    for f in ["template_accuracy.png", "per_class.png", "confusion.png",
              *(f"top5_{t['kind']}_{k}.png" for t in details["top5"][:1] for k in (0,))]:
        assert Image.open(Path("figures/zeroshot") / f).size[0] > 100
    # predictions/p1.csv is what hw3_1 writes for the same images
    assert hw3_1.main([str(p1 / "p1_data" / "val"), str(p1 / "p1_data" / "id2label.json"),
                       str(tmp_path / "hw3_1.csv"), "--params", str(params)]) == 0
    assert read_csv("predictions/p1.csv") == read_csv(tmp_path / "hw3_1.csv")
    # and its accuracy is the ensemble's as scored from the CSV
    header, rows = read_csv("predictions/p1.csv")
    acc = sum(int(n.split("_")[0]) == int(l) for n, l in rows) / len(rows)
    assert acc == pytest.approx(metrics["accuracy"]["ensemble"])


def test_true_labels_say_which_images_they_cannot_score(capsys):
    paths = [Path(n) for n in ("0_1.png", "7_2.png", "foo.png", "1_3.png")]
    assert zs.true_labels(paths, {0: "cat", 1: "dog"}) == [0, 7, None, 1]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "1 image(s) not named {class_id}_{n}.ext" in err[0] and "foo.png" in err[0]
    assert "1 image(s) of a class id that id2label.json lacks" in err[1] and "7_2.png" in err[1]


def test_id2label_with_a_key_written_twice_is_refused(tmp_path):
    path = tmp_path / "id2label.json"
    path.write_text('{"0": "cat", "1": "dog", "0": "bird"}')
    with pytest.raises(zs.LabelMapError, match="id 0 appears twice"):
        zs.read_id2label(path)


def test_a_torchscript_file_is_refused_without_running_it(tmp_path):
    """TorchScript runs code at load, and clip.load's fallback would unpickle the file without
    restriction: a path to one is refused, naming it; CLIP names still go to clip.load."""
    from evaluation.clip_io import CheckpointError, load_clip
    ts = tmp_path / "clip.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), ts)
    with pytest.raises(CheckpointError, match=rf"{ts}: a TorchScript archive.*give the CLIP's name"):
        load_clip(ts)
