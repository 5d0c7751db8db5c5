"""The captioning pipeline end to end on a tiny world: extract -> train -> decode -> score ->
select -> hw3_2.sh, each stage script run as DVC runs it, in a scratch folder."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from captioning.gpt2 import GPT2, GPT2Config, course_state_dict
from tests.tiny_world import build_tiny_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def ran(world):
    """Run the stages in order, as dvc repro would."""
    from stages import decode, extract, score, select, train
    cwd = os.getcwd()
    os.chdir(world)
    try:
        extract.main([])
        for variant in ("lora", "visual_prefix"):
            train.main(["--variant", variant])
            decode.main(["--variant", variant])
            score.main(["--variant", variant])
        select.main([])
    finally:
        os.chdir(cwd)
    return world


def test_stages_write_their_outputs(ran):
    for variant in ("lora", "visual_prefix"):
        live = ran / "live/train" / variant
        assert json.loads((live / "metrics.json").read_text())["epoch"] == 2
        val_cider = (live / "plots/metrics/val/cider.tsv").read_text().splitlines()
        assert val_cider[0] == "step\tcider" and len(val_cider) == 3   # two epochs
        metrics = json.loads((ran / "metrics" / f"{variant}.json").read_text())
        assert {"cider", "clipscore", "bleu4", "rougeL", "cider_blind"} <= metrics.keys()
        val = json.loads((ran / "predictions" / variant / "val.json").read_text())
        assert len(val) == 8 and all(isinstance(c, str) for c in val.values())
        timing = json.loads((ran / "logs/decode" / f"{variant}.json").read_text())
        assert timing["val_images"] == 8 and timing["processes"] == 1 and timing["device"] == "cpu"
        assert timing["val_captions_per_second"] == pytest.approx(8 / timing["val_seconds"], rel=0.1)
        assert sorted(json.loads((ran / "predictions" / variant / "p3.json").read_text())) == \
            ["bike", "girl", "sheep", "ski", "umbrella"]
    selected = json.loads((ran / "release/selected.json").read_text())
    assert selected["variant"] in ("lora", "visual_prefix")
    assert {p.name for p in (ran / "release").iterdir()} == \
        {"captioner.safetensors", "encoder.json", "vocab.bpe", "selected.json"}


def hw3_2(ran, tmp_path, decoder, release):
    out = tmp_path / "pred.json"
    result = subprocess.run(
        ["bash", str(REPO / "hw3_2.sh"), str(ran / "hw3_data/p3_data/images"), str(out),
         str(decoder), "--release", str(release)], capture_output=True, text=True)
    return result, out


def test_hw3_2_captions_every_image(ran, tmp_path):
    img_dir = ran / "hw3_data/p2_data/images/val"
    out = tmp_path / "new folder" / "pred.json"
    env = dict(os.environ, PYTHONPATH="")
    result = subprocess.run(
        ["bash", str(REPO / "hw3_2.sh"), str(img_dir), str(out),
         str(ran / "hw3_data/p2_data/decoder_model.bin"), "--release", str(ran / "release")],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    captions = json.loads(out.read_text())
    assert sorted(captions) == sorted(p.stem for p in img_dir.iterdir())
    assert all(isinstance(c, str) and c.strip() for c in captions.values())
    # the handed-in script gives the captions that were scored (decode stage, cached tokens)
    variant = json.loads((ran / "release/selected.json").read_text())["variant"]
    assert captions == json.loads((ran / "predictions" / variant / "val.json").read_text())


def test_hw3_2_refuses_a_decoder_of_another_width(ran, tmp_path):
    torch.manual_seed(1)
    wrong = GPT2(GPT2Config(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=48))
    torch.save(course_state_dict(wrong), tmp_path / "wrong.bin")
    result, out = hw3_2(ran, tmp_path, tmp_path / "wrong.bin", ran / "release")
    assert result.returncode == 1
    assert "wrong.bin" in result.stderr and not out.exists()


def test_hw3_2_refuses_a_decoder_with_the_right_shapes_and_other_weights(ran, tmp_path):
    sd = torch.load(ran / "hw3_data/p2_data/decoder_model.bin", weights_only=True)
    key = next(k for k in sorted(sd) if k.endswith("mlp.c_fc.weight"))
    sd[key] = sd[key] * 1.01
    torch.save(sd, tmp_path / "other.bin")
    result, out = hw3_2(ran, tmp_path, tmp_path / "other.bin", ran / "release")
    assert result.returncode == 1 and not out.exists()
    assert "other.bin: not the decoder checkpoint" in result.stderr, result.stderr


def test_hw3_2_hostile_folder(ran, tmp_path):
    """Every readable image gets a caption, each unreadable one a stderr line, exit status 3."""
    from tests.hostile_images import READABLE, UNREADABLE, make_hostile_folder
    folder = make_hostile_folder(tmp_path / "imgs dir")
    out = tmp_path / "out dir" / "pred.json"
    result = subprocess.run(
        ["bash", str(REPO / "hw3_2.sh"), str(folder), str(out),
         str(ran / "hw3_data/p2_data/decoder_model.bin"), "--release", str(ran / "release")],
        capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    for name in UNREADABLE:
        assert sum(name in line for line in result.stderr.splitlines()) == 1, result.stderr
    captions = json.loads(out.read_text(encoding="utf-8"))
    assert sorted(captions) == sorted(Path(n).stem for n in READABLE)
    assert all(c.strip() for c in captions.values())


def test_hw3_2_missing_folder_writes_nothing(ran, tmp_path):
    out = tmp_path / "pred.json"
    result = subprocess.run(
        ["bash", str(REPO / "hw3_2.sh"), str(tmp_path / "no such folder"), str(out),
         str(ran / "hw3_data/p2_data/decoder_model.bin"), "--release", str(ran / "release")],
        capture_output=True, text=True)
    assert result.returncode == 1 and "no such folder" in result.stderr and not out.exists()


@pytest.mark.parametrize("case", ["unreadable images", "output under a file", "selected.json without decode"])
def test_hw3_2_fatal_inputs_write_nothing(ran, tmp_path, case):
    img_dir, out, release = ran / "hw3_data/p3_data/images", tmp_path / "pred.json", ran / "release"
    if case == "unreadable images":
        img_dir = tmp_path / "broken"
        img_dir.mkdir()
        for name in ("a.jpg", "b.png"):
            (img_dir / name).write_bytes(b"not an image")
        message = "broken: none of its 2 image files could be read"
    elif case == "output under a file":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "pred.json"
        message = "a_file is not a writable folder"
    else:
        release = tmp_path / "release"
        shutil.copytree(ran / "release", release)
        selected = json.loads((release / "selected.json").read_text())
        del selected["decode"]
        (release / "selected.json").write_text(json.dumps(selected))
        message = "selected.json: no 'decode' entry"
    result = subprocess.run(
        ["bash", str(REPO / "hw3_2.sh"), str(img_dir), str(out),
         str(ran / "hw3_data/p2_data/decoder_model.bin"), "--release", str(release)],
        capture_output=True, text=True)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_hw3_2_never_writes_over_an_input(ran, tmp_path):
    """OUT_JSON naming the decoder, an image, or a released file is refused before anything is
    loaded, and that input is left as it was."""
    decoder, images, release = tmp_path / "decoder.bin", tmp_path / "images", tmp_path / "release"
    shutil.copy(ran / "hw3_data/p2_data/decoder_model.bin", decoder)
    shutil.copytree(ran / "hw3_data/p3_data/images", images)
    shutil.copytree(ran / "release", release)
    image = sorted(images.iterdir())[0]
    for out in (decoder, image, release / "captioner.safetensors"):
        before = out.read_bytes()
        result = subprocess.run(["bash", str(REPO / "hw3_2.sh"), str(images), str(out),
                                 str(decoder), "--release", str(release)],
                                capture_output=True, text=True)
        assert result.returncode == 1 and "is an input" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and out.read_bytes() == before


@pytest.mark.parametrize("option, message", [
    (["--device", "gpu"], "--device 'gpu': not a device"),
    (["--batch-size", "0"], "--batch-size: 0 is below the least allowed, 1"),
])
def test_hw3_2_bad_options_are_named(ran, tmp_path, option, message):
    out = tmp_path / "pred.json"
    result = subprocess.run(
        ["bash", str(REPO / "hw3_2.sh"), str(ran / "hw3_data/p3_data/images"), str(out),
         str(ran / "hw3_data/p2_data/decoder_model.bin"), "--release", str(ran / "release"),
         *option], capture_output=True, text=True)
    assert result.returncode in (1, 2) and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_hw3_2_refuses_a_truncated_decoder(ran, tmp_path):
    good = (ran / "hw3_data/p2_data/decoder_model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[: len(good) // 2])
    result, out = hw3_2(ran, tmp_path, tmp_path / "cut.bin", ran / "release")
    assert result.returncode == 1 and "cut.bin" in result.stderr and not out.exists()


def test_hw3_2_refuses_a_release_whose_encoder_is_not_the_checkpoints(ran, tmp_path):
    """selected.json names an encoder other than the one the checkpoint was trained on."""
    release = tmp_path / "release"
    shutil.copytree(ran / "release", release)
    other = tmp_path / "other_clip.pt"
    clip_state = torch.load(ran / "clip.pt", weights_only=True)
    clip_state["visual.proj"] = clip_state["visual.proj"] + 1.0
    torch.save(clip_state, other)
    selected = json.loads((release / "selected.json").read_text())
    selected["encoder"]["name"] = str(other)
    (release / "selected.json").write_text(json.dumps(selected))
    result, out = hw3_2(ran, tmp_path, ran / "hw3_data/p2_data/decoder_model.bin", release)
    assert result.returncode == 1 and not out.exists()
    assert "other_clip.pt" in result.stderr and "not the one the checkpoint was trained on" in result.stderr


def test_select_picks_the_best_cider_then_clipscore():
    from stages.select import best_variant
    assert best_variant({"a": {"cider": 1.0, "clipscore": 0.9}, "b": {"cider": 1.2, "clipscore": 0.1}}) == "b"
    assert best_variant({"a": {"cider": 1.0, "clipscore": 0.9}, "b": {"cider": 1.0, "clipscore": 0.8}}) == "a"
    # score.metrics without clipscore: CIDEr alone decides (ties: the first name)
    assert best_variant({"b": {"cider": 1.0}, "a": {"cider": 1.0}, "c": {"cider": 0.5}}) == "a"


def prefetch(release, params, **env):
    return subprocess.run(
        [str(REPO / "scripts/run_module.sh"), "stages.hw3_prefetch", "--release", str(release),
         "--params", str(params)], capture_output=True, text=True, env={**os.environ, **env})


def test_prefetch_loads_the_released_encoder_and_the_zero_shot_clip(ran, tmp_path):
    """What hw3_download.sh runs after unpacking the release: both models load through hw3's own
    code."""
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"zeroshot": {"clip": str(ran / "clip.pt")}}))
    result = prefetch(ran / "release", params)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ready: ") == 2 and "clip.pt" in result.stdout


@pytest.mark.parametrize("encoder, message", [
    ({"kind": "timm", "name": "vit_tiny_patch16_224"},   # in no cache here, and no network
     "hw3_2 image encoder: timm vit_tiny_patch16_224: "),
    ({"kind": "timn", "name": "x"}, "selected.json: encoder: kind must be"),
])
def test_prefetch_names_what_it_cannot_load_in_one_line(ran, tmp_path, encoder, message):
    release = tmp_path / "release"
    shutil.copytree(ran / "release", release)
    selected = json.loads((release / "selected.json").read_text())
    selected["encoder"] = encoder
    (release / "selected.json").write_text(json.dumps(selected))
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"zeroshot": {"clip": str(ran / "clip.pt")}}))
    result = prefetch(release, params, HF_HUB_OFFLINE="1")
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
