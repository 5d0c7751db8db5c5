"""The demo CLIP: a tiny config trains a few steps; the saved file reloads through clip.load and
evaluation.clip_io.load_clip; the short-context text path and the multi-positive loss are exact."""
import csv
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from demo import clip_train
from demo.clip_train import DemoClipConfig, contrastive_loss, encode_text_prefix
from demo.scenes import SceneConfig, write_hw3_data
from evaluation.clip_io import load_clip

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip

SCENE = dict(seed=1, image_size=32, n_train=16, n_val=2, n_classes=6, n_p1_per_class=2)
TINY = dict(embed_dim=32, vision_width=64, vision_layers=1, vision_patch_size=8,
            transformer_width=64, transformer_layers=1, batch_size=8, steps=3, warmup_steps=1,
            n_single=16, eval_every=2, threads=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipdemo")
    scene_cfg = SceneConfig(**SCENE)
    write_hw3_data(root / "hw3_data", scene_cfg, progress=False)
    data = clip_train.load_pairs(root / "hw3_data", scene_cfg, TINY["n_single"], progress=False)
    return root, scene_cfg, data


@pytest.fixture(scope="module")
def trained(world):
    root, scene_cfg, data = world
    cfg = DemoClipConfig(**TINY)
    eval_set = clip_train.p1_eval_set(root / "hw3_data", 32)
    model, curve = clip_train.train_clip(cfg, data, 32, eval_set=eval_set, progress=False)
    path = clip_train.save_clip(model, root / "clip_demo.pt")
    return model, curve, path


def test_pairs(world):
    _, scene_cfg, data = world
    n = SCENE["n_train"] + TINY["n_single"]
    assert data.pixels.shape == (n, 32, 32, 3) and data.pixels.dtype == torch.uint8
    assert len(data.caption_start) == n + 1 and data.caption_start[-1] == len(data.tokens) == 5 * n
    # tokens are clip.tokenize cut after the longest caption's EOT
    assert (data.tokens.argmax(dim=-1) < data.tokens.shape[1]).all()
    assert data.tokens.argmax(dim=-1).max() == data.tokens.shape[1] - 1
    assert (data.key[:SCENE["n_train"]] < 0).all() and (data.key[SCENE["n_train"]:] >= 0).all()


def test_training_curve_and_weights_change(trained):
    model, curve, _ = trained
    assert [r["step"] for r in curve] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in curve)
    assert [("zeroshot_accuracy" in r) for r in curve] == [False, True, True]
    cfg = DemoClipConfig(**TINY)
    assert [r["lr"] for r in curve] == [clip_train.lr_at(s, cfg) for s in range(3)]
    torch.manual_seed(cfg.seed)   # what train_clip does before building: the initial weights
    init = clip_train.build_clip(cfg, 32).state_dict()
    changed = [k for k, v in init.items() if not torch.equal(v, model.state_dict()[k])]
    assert "visual.conv1.weight" in changed and "text_projection" in changed


def test_reload_through_clip_load_and_load_clip(trained):
    model, _, path = trained
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert sd["positional_embedding"].shape[0] == 77
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())

    images = torch.randn(3, 3, 32, 32)
    tokens = clip.tokenize(["a photo of a red circle", "two shapes: a blue star and a cross", "x"])
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(images), model.encode_text(tokens)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded, preprocess = clip.load(str(path), jit=False, device="cpu")
        loaded.eval()
        assert loaded.visual.input_resolution == 32 and loaded.context_length == 77
        # clip.load rounds the weights through fp16: equal to fp16 precision
        torch.testing.assert_close(loaded.encode_image(images), ref_img, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(loaded.encode_text(tokens), ref_txt, atol=2e-2, rtol=2e-2)

        exact, preprocess2 = load_clip(path)
        assert torch.equal(exact.encode_image(images), ref_img)
        assert torch.equal(exact.encode_text(tokens), ref_txt)
    for k, v in model.state_dict().items():
        assert torch.equal(exact.state_dict()[k], v), k


def test_preprocess_matches_training_normalisation(world, trained):
    root, _, _ = world
    _, _, path = trained
    _, preprocess = load_clip(path)
    f = sorted((root / "hw3_data" / "p1_data" / "val").glob("*.png"))[0]
    from PIL import Image
    with Image.open(f) as im:
        via_preprocess = preprocess(im.convert("RGB"))
        via_training = clip_train.normalise(torch.from_numpy(np.asarray(im.convert("RGB")).copy())[None])[0]
    torch.testing.assert_close(via_training, via_preprocess, atol=1e-6, rtol=0)


def test_training_is_deterministic(world, trained):
    _, _, data = world
    model, _, _ = trained
    again, _ = clip_train.train_clip(DemoClipConfig(**TINY), data, 32, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_saved_file_bytes_do_not_depend_on_the_path(trained, tmp_path):
    """torch.save names its archive after the file it writes: written through the atomic
    temporary file (a per-run name), every run's bytes, and DVC's hashes, would differ."""
    model, _, _ = trained
    first = clip_train.save_clip(model, tmp_path / "a" / "clip_demo.pt")
    second = clip_train.save_clip(model, tmp_path / "b" / "other.pt")
    assert first.read_bytes() == second.read_bytes()


def test_resnet_tower_trains_and_reloads_at_its_input_resolution(world, tmp_path):
    """clip's ModifiedResNet tower, fed 32 px images resized to its 64 px input exactly as
    clip's preprocess resizes them; the saved file reloads through load_clip unchanged."""
    root, scene_cfg, _ = world
    cfg = DemoClipConfig(**{**TINY, "vision_layers": [1, 1, 1, 1], "vision_width": 8,
                            "input_resolution": 64, "steps": 2})
    res = cfg.model_resolution(scene_cfg.image_size)
    data = clip_train.load_pairs(root / "hw3_data", scene_cfg, 8, res, progress=False)
    assert res == 64 and data.pixels.shape[1:] == (64, 64, 3)
    model, curve = clip_train.train_clip(cfg, data, res, progress=False)
    assert len(curve) == 2 and all(np.isfinite(r["loss"]) for r in curve)
    exact, preprocess = load_clip(clip_train.save_clip(model, tmp_path / "rn.pt"))
    assert exact.visual.input_resolution == 64
    pixels, _, _ = clip_train.p1_eval_set(root / "hw3_data", scene_cfg.image_size, res)
    from PIL import Image
    with Image.open(sorted((root / "hw3_data/p1_data/val").glob("*.png"))[0]) as im:
        via_preprocess = preprocess(im.convert("RGB"))
    torch.testing.assert_close(clip_train.normalise(pixels[:1])[0], via_preprocess, atol=1e-6, rtol=0)
    with torch.no_grad():
        x = clip_train.normalise(pixels[:4])
        assert torch.equal(exact.encode_image(x), model.encode_image(x))


def test_short_text_context_is_exact(trained):
    model, _, _ = trained
    tokens = clip.tokenize(["a photo of a red circle", "a big blue star to the left of a cross"])
    n = int(tokens.argmax(dim=-1).max()) + 1
    with torch.no_grad():
        torch.testing.assert_close(encode_text_prefix(model, tokens[:, :n]), model.encode_text(tokens),
                                   atol=1e-5, rtol=1e-5)


def test_multi_positive_loss():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(0.0)   # logit scale 1
    unique = torch.tensor([-1, -2, -3, -4])
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    expected = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, unique), expected)
    # items 0 and 1 share a class: each row puts half its target on each
    shared = torch.tensor([5, 5, -3, -4])
    target = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1., 0], [0, 0, 0, 1.]])
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, shared), expected)


def test_batches_group_single_objects_by_colour(world):
    _, _, data = world
    cfg = DemoClipConfig(**{**TINY, "batch_size": 10, "single_frac": 0.6, "colours_per_batch": 2})
    sampler = clip_train.BatchSampler(data, cfg, np.random.default_rng(0))
    for _ in range(20):
        idx, cap = sampler()
        idx, cap = idx.numpy(), cap.numpy()
        assert len(idx) == 10
        single = idx[data.key[idx] >= 0]
        assert len(single) == 6 and len(set(data.colour[single])) <= 2
        assert ((data.caption_start[idx] <= cap) & (cap < data.caption_start[idx + 1])).all()


def test_sincos_position_init_knows_neighbours():
    cfg = DemoClipConfig(**TINY)
    model = clip_train.build_clip(DemoClipConfig(**{**TINY, "vision_patch_size": 4}), 32)
    pe = F.normalize(model.visual.positional_embedding[1:], dim=-1)   # 8 x 8 grid, row-major
    sim = pe @ pe.T
    assert sim[0, 1] > sim[0, 7] and sim[0, 8] > sim[0, 56] and sim[9, 10] > sim[9, 63]
    random = clip_train.build_clip(DemoClipConfig(**{**TINY, "pos_init": "random"}), 32)
    assert random.visual.positional_embedding[0].abs().sum() > 0
    assert cfg.pos_init == "sincos"


def test_lr_schedule():
    cfg = DemoClipConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_frac=0.1)
    lrs = [clip_train.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


@pytest.mark.parametrize("kw, name", [
    (dict(vision_width=96), "vision_width"),
    (dict(transformer_width=0), "transformer_width"),
    (dict(steps=0), "steps"),
    (dict(single_frac=1.5), "single_frac"),
    (dict(lr=0), "lr"),
    (dict(pos_init="learned"), "pos_init"),
    (dict(vision_layers=[1, 1, 1]), "vision_layers"),
    (dict(vision_layers=[1, 1, 1, 1], vision_width=7), "vision_width"),
    (dict(input_resolution=-1), "input_resolution"),
])
def test_bad_config_names_the_parameter(kw, name):
    with pytest.raises(ValueError, match=rf"DemoClipConfig\.{name}="):
        DemoClipConfig(**kw)


def test_input_resolution_must_fit_the_tower():
    with pytest.raises(ValueError, match=r"DemoClipConfig\.input_resolution=48.*multiple of 32"):
        DemoClipConfig(vision_layers=[1, 1, 1, 1], vision_width=8, input_resolution=48).model_resolution(32)
    with pytest.raises(ValueError, match=r"DemoClipConfig\.vision_patch_size=8 does not divide"):
        DemoClipConfig(vision_patch_size=8, input_resolution=36).model_resolution(32)


def test_stage_end_to_end(world, tmp_path):
    """The demo_clip stage on tiny params: checkpoint, metrics and curves with sane values."""
    import yaml
    from stages import demo_clip
    root, _, _ = world
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"demo_data": SCENE, "demo_clip": {**TINY, "template": "a photo of a {object}"}}))
    out = tmp_path / "clip.pt"
    demo_clip.main(["--params", str(params), "--data", str(root / "hw3_data"), "--out", str(out),
                    "--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "plots"),
                    "--log", str(tmp_path / "log.json")])   # not the repository's logs/
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_images"] == 12 and m["n_classes"] == 6 and m["chance"] == pytest.approx(1 / 6)
    for k in ("accuracy", "colour_accuracy", "shape_accuracy"):
        assert 0.0 <= m[k] <= 1.0
    assert m["accuracy"] <= min(m["colour_accuracy"], m["shape_accuracy"])
    with open(tmp_path / "plots" / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    model, _ = load_clip(out)
    assert model.visual.input_resolution == 32
