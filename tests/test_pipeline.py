"""The captioning pipeline end to end on a tiny world: extract -> train -> decode -> score ->
select -> hw3_2.sh, each stage script run as DVC runs it, in a scratch folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import clip.model
import pytest
import torch
import yaml

from demo.scenes import SceneConfig, write_hw3_data
from demo.vocab import read_captions, train_vocab, write_vocab
from models.gpt2 import GPT2, GPT2Config, course_state_dict
from models.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny_clip(path):
    torch.manual_seed(0)
    model = clip.model.CLIP(embed_dim=64, image_resolution=32, vision_layers=1, vision_width=64,
                            vision_patch_size=8, context_length=77, vocab_size=49408,
                            transformer_width=64, transformer_heads=1, transformer_layers=1)
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A scratch repository folder holding a tiny hw3_data, vocabulary, GPT-2 and CLIP."""
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "hw3_data"
    write_hw3_data(data, SceneConfig(image_size=32, n_train=24, n_val=8, n_classes=4,
                                     n_p1_per_class=1), progress=False)
    p2 = data / "p2_data"
    encoder, merges = train_vocab(read_captions(p2 / "train.json"), 300)
    write_vocab(encoder, merges, p2)
    tok = Tokenizer.from_files(p2 / "encoder.json", p2 / "vocab.bpe")
    torch.manual_seed(0)
    gpt2 = GPT2(GPT2Config(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    torch.save(course_state_dict(gpt2), p2 / "decoder_model.bin")
    tiny_clip(root / "clip.pt")
    params = {
        "world": {"data_root": str(data), "decoder": str(p2 / "decoder_model.bin"),
                  "decoder_heads": 2, "encoder_json": str(p2 / "encoder.json"),
                  "vocab_bpe": str(p2 / "vocab.bpe"), "clip": str(root / "clip.pt")},
        "extract": {"encoder": {"kind": "clip", "name": str(root / "clip.pt")},
                    "splits": {"train": "p2_data/images/train", "val": "p2_data/images/val",
                               "p3": "p3_data/images"},
                    "clipscore_splits": ["val"], "batch_size": 8, "device": "cpu"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.003, "warmup_steps": 2,
                  "val_images": 4, "val_batch_size": 4},
        "bridge": {"layers": [], "prefix_hidden": 0},
        "peft": {"rank": 2, "adapter_size": 4, "prefix_length": 2},
        "variants": {"lora": {"bridge": "gated_cross", "peft": "lora"},
                     "llava": {"bridge": "prefix", "peft": "lora"}},
        "decode": {"method": "beam", "beam_size": 2, "max_new_tokens": 8, "batch_size": 4},
        "score": {"metrics": ["cider", "clipscore", "bleu4", "rougeL"]},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="module")
def ran(world):
    """Run the stages in order, as dvc repro would."""
    from stages import decode, extract, score, select, train
    cwd = os.getcwd()
    os.chdir(world)
    try:
        extract.main([])
        for variant in ("lora", "llava"):
            train.main(["--variant", variant])
            decode.main(["--variant", variant])
            score.main(["--variant", variant])
        select.main([])
    finally:
        os.chdir(cwd)
    return world


def test_stages_write_their_outputs(ran):
    for variant in ("lora", "llava"):
        history = json.loads((ran / "plots/train" / f"{variant}.json").read_text())
        assert [row["epoch"] for row in history] == [1, 2]
        metrics = json.loads((ran / "metrics" / f"{variant}.json").read_text())
        assert {"cider", "clipscore", "bleu4", "rougeL", "cider_blind"} <= metrics.keys()
        val = json.loads((ran / "predictions" / variant / "val.json").read_text())
        assert len(val) == 8 and all(isinstance(c, str) for c in val.values())
        assert sorted(json.loads((ran / "predictions" / variant / "p3.json").read_text())) == \
            ["bike", "girl", "sheep", "ski", "umbrella"]
    selected = json.loads((ran / "release/selected.json").read_text())
    assert selected["variant"] in ("lora", "llava")
    assert {p.name for p in (ran / "release").iterdir()} == \
        {"captioner.safetensors", "encoder.json", "vocab.bpe", "selected.json"}


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


def test_hw3_2_refuses_a_decoder_of_another_width(ran, tmp_path):
    torch.manual_seed(1)
    wrong = GPT2(GPT2Config(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=48))
    torch.save(course_state_dict(wrong), tmp_path / "wrong.bin")
    out = tmp_path / "pred.json"
    result = subprocess.run(
        ["bash", str(REPO / "hw3_2.sh"), str(ran / "hw3_data/p3_data/images"), str(out),
         str(tmp_path / "wrong.bin"), "--release", str(ran / "release")],
        capture_output=True, text=True)
    assert result.returncode == 1
    assert "wrong.bin" in result.stderr and not out.exists()


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
