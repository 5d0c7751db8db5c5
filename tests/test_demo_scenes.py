"""The demo world's generator: layout, JSON schema, captions that name what was drawn,
determinism, and impossible parameters stopped with a message naming the parameter."""
import json
import re
from common.params import from_section
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo import scenes
from demo.scenes import COLOURS, SHAPE_WORDS, SceneConfig, write_hw3_data
from common.errors import ParamsError

TINY = dict(seed=3, image_size=48, n_train=12, n_val=4, n_classes=12, n_p1_per_class=2)


def tiny(**kw):
    return SceneConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def hw3(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "hw3_data"
    write_hw3_data(root, tiny(), progress=False)
    return root


def all_files(root):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())


def test_layout_and_p1_names_match_id2label(hw3):
    cfg = tiny()
    id2label = json.loads((hw3 / "p1_data" / "id2label.json").read_text())
    assert list(id2label) == [str(k) for k in range(cfg.n_classes)]
    assert len(set(id2label.values())) == cfg.n_classes
    for name in id2label.values():
        colour, shape = name.split(" ")
        assert colour in cfg.colours and shape in cfg.shapes
    # every colour and every shape appears among the classes, even with a prefix of the product
    assert {n.split()[0] for n in id2label.values()} == set(cfg.colours)
    assert {n.split()[1] for n in id2label.values()} == set(cfg.shapes)

    files = sorted((hw3 / "p1_data" / "val").iterdir())
    assert len(files) == cfg.n_classes * cfg.n_p1_per_class
    per_class = {}
    for f in files:
        m = re.fullmatch(r"(\d+)_(\d+)\.png", f.name)
        assert m, f.name
        per_class.setdefault(m.group(1), []).append(f)
        with Image.open(f) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (48, 48)
    assert set(per_class) == set(id2label)
    assert all(len(v) == cfg.n_p1_per_class for v in per_class.values())

    p3 = sorted(p.name for p in (hw3 / "p3_data" / "images").iterdir())
    assert p3 == ["bike.jpg", "girl.jpg", "sheep.jpg", "ski.jpg", "umbrella.jpg"]
    assert not [p for p in hw3.parent.iterdir() if p.name.startswith(".tmp")]


def test_p1_images_show_the_class_colour(hw3):
    """The pixel at the object's centre has the class colour (the drawing matches the label)."""
    cfg = tiny()
    id2label = json.loads((hw3 / "p1_data" / "id2label.json").read_text())
    for class_id, image_id, scene in scenes.p1_scenes(cfg):
        ob = scene.objects[0]
        assert f"{ob.colour} {ob.shape}" == id2label[str(class_id)]
        with Image.open(hw3 / "p1_data" / "val" / f"{class_id}_{image_id}.png") as im:
            px = np.asarray(im)[int(ob.cy), int(ob.cx)].astype(int)
        assert np.abs(px - np.array(COLOURS[ob.colour])).max() < 40, (class_id, px)


@pytest.mark.parametrize("split", ["train", "val"])
def test_p2_coco_json(hw3, split):
    cfg = tiny()
    meta = json.loads((hw3 / "p2_data" / f"{split}.json").read_text())
    assert set(meta) == {"images", "annotations"}
    images = meta["images"]
    assert len(images) == (cfg.n_train if split == "train" else cfg.n_val)
    assert all(set(im) == {"file_name", "id"} for im in images)
    on_disk = sorted(p.name for p in (hw3 / "p2_data" / "images" / split).iterdir())
    assert sorted(im["file_name"] for im in images) == on_disk
    for name in on_disk:
        with Image.open(hw3 / "p2_data" / "images" / split / name) as im:
            assert im.format == "JPEG" and im.size == (48, 48)
    ids = {im["id"] for im in images}
    assert len(ids) == len(images)
    by_image = {}
    for a in meta["annotations"]:
        assert set(a) == {"caption", "image_id", "id"}
        assert isinstance(a["caption"], str) and a["caption"].strip()
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    assert set(by_image) == ids
    assert all(len(c) == len(set(c)) == cfg.captions_per_image for c in by_image.values())


def test_annotation_and_image_ids_unique_across_splits(hw3):
    train = json.loads((hw3 / "p2_data" / "train.json").read_text())
    val = json.loads((hw3 / "p2_data" / "val.json").read_text())
    img_ids = [i["id"] for i in train["images"] + val["images"]]
    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(img_ids)) == len(img_ids) and len(set(ann_ids)) == len(ann_ids)


COUNT = {"two": 2, "three": 3}
ALL_COLOURS = tuple(COLOURS)


def mentioned(caption, words):
    return {w for w in words if re.search(rf"\b{w}\b", caption)}


def shape_mentions(caption):
    found = set()
    for shape, words in SHAPE_WORDS.items():
        if any(re.search(rf"\b{w}(e?s)?\b", caption) for w in words):
            found.add(shape)
    return found


def test_captions_name_what_was_drawn():
    cfg = tiny(n_train=60, seed=11)
    for scene in scenes.split_scenes(cfg, "train", cfg.n_train, progress=False):
        drawn_colours = {o.colour for o in scene.objects}
        drawn_shapes = {o.shape for o in scene.objects}
        assert len(scene.captions) == len(set(scene.captions)) == cfg.captions_per_image
        for cap in scene.captions:
            assert mentioned(cap, ALL_COLOURS) <= drawn_colours, (cap, scene.objects)
            assert shape_mentions(cap) <= drawn_shapes, (cap, scene.objects)
            for word, n in COUNT.items():
                if re.search(rf"\b{word}\b", cap):
                    assert len(scene.objects) == n, (cap, scene.objects)
            if len(scene.objects) == 1:
                ob = scene.objects[0]
                assert ob.colour in cap and shape_mentions(cap) == {ob.shape}, cap
        # together the captions name every object (colour next to a word for its shape)
        text = " | ".join(scene.captions)
        for ob in scene.objects:
            words = "|".join(SHAPE_WORDS[ob.shape])
            assert re.search(rf"\b{ob.colour} ({words})", text), (ob, scene.captions)


def test_spatial_words_follow_positions():
    a = scenes.SceneObject("circle", "red", "small", cx=10, cy=30, extent=8)
    b = scenes.SceneObject("star", "blue", "small", cx=40, cy=32, extent=8)
    c = scenes.SceneObject("cross", "green", "small", cx=11, cy=5, extent=8)
    assert scenes._relation(a, b) == "to the left of"
    assert scenes._relation(b, a) == "to the right of"
    assert scenes._relation(c, a) == "above"
    assert scenes._relation(a, c) == "below"
    assert c.where(48) == "in the top left"
    assert b.where(48) == "in the bottom right"
    assert scenes.SceneObject("star", "red", "small", 24, 20, 8).where(48) == "in the centre"
    assert scenes.SceneObject("star", "red", "small", 24, 5, 8).where(48) == "at the top"


def test_p1_objects_are_centred_portraits():
    cfg = tiny()
    for _, _, scene in scenes.p1_scenes(cfg):
        (ob,) = scene.objects
        assert cfg.single_min_frac * 48 <= ob.extent <= cfg.single_max_frac * 48
        assert abs(ob.cx - 24) <= cfg.single_jitter * 48 + 1e-6 and abs(ob.cy - 24) <= cfg.single_jitter * 48 + 1e-6


def test_size_words_follow_extent():
    cfg = tiny(n_train=40)
    mid = (cfg.object_min_frac + cfg.object_max_frac) / 2 * cfg.image_size
    for scene in scenes.split_scenes(cfg, "train", cfg.n_train, progress=False):
        for ob in scene.objects:
            assert ob.size == ("small" if ob.extent < mid else "large")
            assert cfg.object_min_frac * cfg.image_size * 0.5 <= ob.extent <= cfg.object_max_frac * cfg.image_size


def test_deterministic_bytes_and_seed_matters(tmp_path, hw3):
    again = write_hw3_data(tmp_path / "again" / "hw3_data", tiny(), progress=False)
    assert all_files(again) == all_files(hw3)
    for rel in all_files(hw3):
        assert (again / rel).read_bytes() == (hw3 / rel).read_bytes(), rel
    other = write_hw3_data(tmp_path / "other" / "hw3_data", tiny(seed=4), progress=False)
    assert (other / "p2_data" / "train.json").read_bytes() != (hw3 / "p2_data" / "train.json").read_bytes()


def test_rewrite_replaces_the_folder_atomically(tmp_path):
    root = tmp_path / "hw3_data"
    write_hw3_data(root, tiny(n_train=3, n_val=2), progress=False)
    (root / "stale.txt").write_text("left over")
    write_hw3_data(root, tiny(n_train=3, n_val=2), progress=False)
    assert not (root / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hw3_data"]


@pytest.mark.parametrize("kw, name", [
    (dict(n_train=0), "n_train"),
    (dict(n_val=0), "n_val"),
    (dict(n_p1_per_class=0), "n_p1_per_class"),
    (dict(n_classes=0), "n_classes"),
    (dict(n_classes=6 * 8 + 1), "n_classes"),
    (dict(captions_per_image=0), "captions_per_image"),
    (dict(captions_per_image=20), "captions_per_image"),
    (dict(max_objects=4), "max_objects"),
    (dict(min_objects=2, max_objects=1), "min_objects"),
    (dict(shapes=("circle", "blob")), "shapes"),
    (dict(colours=("red", "red")), "colours"),
    (dict(image_size=8), "image_size"),
    (dict(object_min_frac=0.5, object_max_frac=0.3), "object_max_frac"),
    (dict(single_min_frac=0.01), "single_min_frac"),
    (dict(single_jitter=0.7), "single_jitter"),
])
def test_impossible_params_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=rf"SceneConfig\.{name}="):
        SceneConfig(**kw)


def test_unknown_param_is_named():
    with pytest.raises(ValueError, match="n_trian"):
        from_section(SceneConfig, {"n_trian": 5}, "demo_data")


def test_stage_stops_on_bad_params(tmp_path):
    from stages import demo_data
    params = tmp_path / "params.yaml"
    params.write_text("demo_data:\n  n_train: 0\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: demo_data: SceneConfig\.n_train=0"):
        demo_data.main(["--params", str(params), "--out", str(tmp_path / "hw3_data")])
    assert not (tmp_path / "hw3_data").exists()
