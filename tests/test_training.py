"""training.loop on a tiny captioner: a bf16 run (the GPU's path, here on the CPU) trains and
checkpoints, the best epoch is what the checkpoint holds, an epoch gives every caption once, a
batch reads each image once, and bad settings are refused by name. (The speed tricks around a
step: tests/test_speed.py.)"""
import math
import random

import pytest
import torch

from captioning.checkpoint import load_trainable
from captioning.tokenizer import caption_batch
from training.loop import CaptionPairs, TrainConfig, TrainingLog, batch_loss, evaluate, train
from tests.test_captioner import DECODER, EOT, batch, build, course_sd, perturb  # noqa: F401

class Quiet(TrainingLog):
    def epoch(self, row):
        pass


QUIET = Quiet()
WORDS = ["a", "red", "blue", "circle", "square", "star", "on", "the", "left", "right"]


class WordTokenizer:
    """Word ids 0..9, end token EOT: enough for CaptionPairs, caption_batch and decoding."""
    eot_id = EOT

    def encode_batch(self, captions):
        return [[WORDS.index(w) for w in c.split()] for c in captions]

    def decode(self, ids):
        return " ".join(WORDS[i] for i in ids if i < len(WORDS))


def pairs(n_images, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n_images, 5, 24, generator=g)
    names = [f"img{i}" for i in range(n_images)]
    refs = {n: [f"a {WORDS[1 + i % 2]} {WORDS[3 + i % 3]}", f"the {WORDS[3 + i % 3]}"]
            for i, n in enumerate(names)}
    return CaptionPairs((names, tokens), refs, WordTokenizer())


def test_bf16_training_runs_and_keeps_the_best_epoch(course_sd, tmp_path, monkeypatch):
    """precision bf16 is what `auto` picks on a GPU; the CPU runs the same code path (here with an
    image's captions batched together)."""
    composed = []   # (shuffled, by image) of every CaptionPairs.batches call
    batches = CaptionPairs.batches
    monkeypatch.setattr(CaptionPairs, "batches", lambda self, size, shuffle, generator=None, by_image=False:
                        composed.append((shuffle, by_image)) or batches(self, size, shuffle, generator, by_image))
    model = build(course_sd, "gated_cross", "lora")
    config = TrainConfig(epochs=3, batch_size=4, lr=0.01, warmup_steps=2, val_images=4,
                         val_batch_size=4, precision="bf16", group_by_image=True)
    history, best = train(model, pairs(8, 0), pairs(4, 1), WordTokenizer(), config,
                          tmp_path / "ckpt.safetensors", torch.device("cpu"), log=QUIET)
    assert [by_image for shuffled, by_image in composed if shuffled] == [True] * 3   # every epoch
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert best["val_cider"] == max(r["val_cider"] for r in history)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    kv = [p for n, p in model.named_parameters() if n.endswith("kv.weight")]   # trainable Linear
    assert kv and all(not torch.equal(p, p.bfloat16().float()) for p in kv)    # fp32 masters kept
    reloaded = build(course_sd, "gated_cross", "lora", seed=5)
    extra = load_trainable(reloaded, tmp_path / "ckpt.safetensors")
    assert extra["epoch"] == best["epoch"]
    for (name, a), b in zip(model.trainable_state_dict().items(), reloaded.trainable_state_dict().values()):
        assert torch.equal(a, b), name   # the model is left holding the best epoch's tensors
    val = pairs(4, 1)
    loss, _, _ = evaluate(reloaded, val, WordTokenizer(), config, torch.device("cpu"), sorted(val.references))
    assert loss == pytest.approx(best["val_loss"], rel=1e-6)


@pytest.mark.parametrize("by_image", [False, True])
def test_an_epoch_gives_every_caption_once(by_image):
    data = pairs(8, seed=0)   # 2 captions per image, listed image by image
    batches = list(data.batches(3, True, random.Random(4), by_image))
    assert [len(b) for b in batches] == [3, 3, 3, 3, 3, 1]
    order = [data.pairs.index(p) for b in batches for p in b]
    assert sorted(order) == list(range(16))
    expected = list(range(16))
    if by_image:   # the images shuffled, each one's captions kept together in their listed order
        images = list(range(8))
        random.Random(4).shuffle(images)
        expected = [2 * i + k for i in images for k in (0, 1)]
    else:
        random.Random(4).shuffle(expected)
    assert order == expected
    assert [data.pairs.index(p) for b in data.batches(3, False) for p in b] == list(range(16))


class RowsRead:
    """`self[rows]`: the image tokens, with the rows every read asked for."""

    def __init__(self, tokens):
        self.tokens, self.reads = tokens, []

    def __getitem__(self, rows):
        self.reads.append(rows.tolist())
        return self.tokens[rows]


def test_a_batch_reads_each_image_once_for_all_its_captions(course_sd):
    data = pairs(4, seed=1)
    model = perturb(build(course_sd, "gated_cross", "adapter"))
    captions = [data.pairs[j] for j in (3, 0, 2, 1, 7)]   # images 1, 0, 1, 0, 3
    tokens = RowsRead(data.tokens)
    config = TrainConfig()
    cpu = torch.device("cpu")
    with torch.no_grad():
        shared = batch_loss(model, captions, tokens.__getitem__, WordTokenizer(), config, cpu)
        assert tokens.reads == [[1, 0, 3]]
        input_ids, targets, _ = caption_batch([t for _, t in captions], EOT, config.max_caption_tokens)
        repeated = model.loss(data.tokens[[i for i, _ in captions]], input_ids, targets)
    torch.testing.assert_close(shared, repeated, rtol=1e-6, atol=0)


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0), ("max_caption_tokens", 1),
                                          ("precision", "fp16"), ("val_images", -1), ("grad_clip", -1.0),
                                          ("lr", -1e-3), ("warmup_steps", -1),
                                          ("group_by_image", "yes"), ("speed", {"compile": "fast"}),
                                          ("speed", {"compile": False})])   # YAML reads off as False
def test_bad_settings_are_refused_by_name(field, value):
    from common.params import from_section
    with pytest.raises(ValueError, match=rf"train\.{field}"):
        from_section(TrainConfig, {field: value}, "train")


def test_grad_clip_zero_means_no_clipping(course_sd):
    """grad_clip: 0 turns clipping off (clip_grad_norm_ with 0 would zero every gradient)."""
    from tests.test_speed import run_steps
    data = pairs(4, seed=3)
    after = []
    for clip in (0.0, 1e9):
        model = perturb(build(course_sd, "gated_cross", "lora"))
        run_steps(model, data, TrainConfig(batch_size=4, grad_clip=clip, weight_decay=0.0),
                  [data.pairs[:4]], lr=1e-2)
        after.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    start = {n: p for n, p in perturb(build(course_sd, "gated_cross", "lora")).named_parameters()
             if p.requires_grad}
    assert all(torch.equal(after[0][n], after[1][n]) for n in start)
    assert any(not torch.equal(after[0][n], start[n]) for n in start)


def test_train_section_numbers_written_as_strings_are_read_as_numbers():
    from common.params import from_section
    config = from_section(TrainConfig, {"lr": "1e-3", "batch_size": "32", "epochs": 2.0}, "train")
    assert config.lr == 1e-3 and config.batch_size == 32 and config.epochs == 2
    assert isinstance(config.batch_size, int) and isinstance(config.epochs, int)
    for section, message in (({"lr": "fast"}, r"train\.lr='fast': expected a number"),
                             ({"epochs": 2.5}, r"train\.epochs=2\.5: expected a whole number"),
                             ({"batch_size": [64]}, r"train\.batch_size=\[64\]: expected a number")):
        with pytest.raises(ValueError, match=message):
            from_section(TrainConfig, section, "train")


def test_every_params_section_error_names_its_source():
    from common.params import from_section
    from common.errors import ParamsError
    from stages.world import World
    for section, message in (
            (["lr", 1], r"^p\.yaml: train: expected a mapping of parameters, got list"),
            ({"epochs": 0}, r"^p\.yaml: train: train\.epochs=0: must be at least 1"),
            ({"precision": "fp8"}, r"^p\.yaml: train: train\.precision='fp8'")):
        with pytest.raises(ValueError, match=message):
            from_section(TrainConfig, section, "p.yaml: train")
    with pytest.raises(ParamsError, match=r"p\.yaml: world: missing parameter\(s\) "
                                          r"\['decoder_heads'"):
        from_section(World, {"data_root": "d", "decoder": "x.bin", "encoder_json": "e",
                             "vocab_bpe": "v", "clip": "c"}, "p.yaml: world")


def test_an_unreadable_params_file_is_one_error_naming_it(tmp_path):
    """Every stage and hw3_1.sh read params through load_params: one ParamsError line, which
    run_stage and hw3_1 print instead of a traceback."""
    from common.params import load_params
    from common.errors import InputError, ParamsError, read_json
    from stages import hw3_1
    p = tmp_path / "p.yaml"
    for content, message in ((None, "no such file"), ("a: [1", "not valid YAML"),
                             (b"\xff\xfe", "not valid YAML"), ("- 1\n", "expected a mapping"),
                             ("", "expected a mapping")):
        if content is None:
            p.unlink(missing_ok=True)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        with pytest.raises(ParamsError, match=rf"^{p}: {message}"):
            load_params(p)
    p.write_text("train: {}\n")
    with pytest.raises(ParamsError, match=rf"^{p}: no zeroshot section"):
        hw3_1.load_config(p)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(ParamsError, match=rf"^{folder}: cannot read"):
        load_params(folder)
    with pytest.raises(InputError, match=rf"^{folder}: cannot read"):   # the JSON reader alike
        read_json(folder, "missing")


def test_a_device_is_checked_where_it_is_named():
    from common.device import resolve_device
    assert resolve_device(None) == resolve_device("auto") == \
        ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    for name in ("gpu", "cuda:x", "mps", 3.5):
        with pytest.raises(ValueError, match=r"--device .*: not a device this tool runs on"):
            resolve_device(name, "--device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="zeroshot.device 'cuda': no CUDA device"):
            resolve_device("cuda", "zeroshot.device")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_a_gated_bridge_logs_each_blocks_gate_every_epoch(course_sd, tmp_path):
    """tanh(gate) of every gated block, every epoch, in the row and in dvclive's curves
    (gates/block<i>.tsv, under the plots folder dvc.yaml declares); other bridges have none."""
    from stages.train import LiveLog
    model = build(course_sd, "gated_cross", "lora", gate_init=0.5)
    config = TrainConfig(epochs=2, batch_size=4, lr=0.01, warmup_steps=1, val_images=2, val_batch_size=4)
    history, _ = train(model, pairs(8, 0), pairs(2, 1), WordTokenizer(), config,
                       tmp_path / "ckpt.safetensors", torch.device("cpu"), log=LiveLog(tmp_path / "live"))
    assert [sorted(r["gates"]) for r in history] == [[0, 1], [0, 1]]
    assert all(r["gates"][b] != pytest.approx(math.tanh(0.5), abs=1e-6) for r in history for b in (0, 1))
    for block in (0, 1):
        lines = (tmp_path / "live" / "plots" / "metrics" / "gates" / f"block{block}.tsv").read_text().split()
        assert lines[:2] == ["step", f"block{block}"]
        assert [float(v) for v in lines[3::2]] == pytest.approx([r["gates"][block] for r in history])
    history, _ = train(build(course_sd, "cross", "lora"), pairs(8, 0), pairs(2, 1), WordTokenizer(),
                       config, tmp_path / "ckpt.safetensors", torch.device("cpu"), log=QUIET)
    assert not any("gates" in r for r in history)


@pytest.mark.parametrize("bridge,peft", [("gated_cross", "lora"), ("visual_prefix", "adapter")])
def test_bridge_only_epochs_hold_the_peft_parameters(course_sd, tmp_path, bridge, peft):
    """train.bridge_only_epochs: 1 steps the bridge alone in epoch 1 (the PEFT parameters as
    initialised, not even decayed), then bridge and PEFT in epoch 2."""
    model = build(course_sd, bridge, peft)
    peft_names = set(model.peft_parameters())
    assert peft_names and peft_names < set(model.trainable_state_dict())
    start = {n: t.clone() for n, t in model.trainable_state_dict().items()}
    seen = []

    class Snapshots(Quiet):
        def epoch(self, row):
            seen.append({n: t.clone() for n, t in model.trainable_state_dict().items()})
    config = TrainConfig(epochs=2, batch_size=4, lr=0.01, warmup_steps=1, val_images=2,
                         val_batch_size=4, weight_decay=0.1, bridge_only_epochs=1)
    train(model, pairs(8, 0), pairs(2, 1), WordTokenizer(), config, tmp_path / "ckpt.safetensors",
          torch.device("cpu"), log=Snapshots())
    changed = lambda before, after: {n for n in before if not torch.equal(before[n], after[n])}
    assert changed(start, seen[0]) == set(start) - peft_names   # epoch 1: the bridge alone
    assert peft_names <= changed(seen[0], seen[1])               # epoch 2: PEFT too
    with pytest.raises(ValueError, match="bridge_only_epochs=2: must be at least 0 and below"):
        TrainConfig(epochs=2, bridge_only_epochs=2)
