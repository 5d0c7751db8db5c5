"""models.training on a tiny captioner: bf16-stored Linear weights (trainable ones with fp32
masters) give exactly the autocast products and updates, a bf16 run (the GPU's path, here on
the CPU) trains and checkpoints, the best epoch is what the checkpoint holds, compiled training
trains the same model as eager training, and bad settings are refused by name."""
import random
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from models.checkpoint import load_trainable
from models.precision import StoredLinearWeights
from models.tokenizer import caption_batch
from models.training import (CaptionPairs, TrainConfig, batch_loss, evaluate, make_optimizer,
                             on_device_if_fits, train, train_step, training_steps)
from tests.test_captioner import DECODER, EOT, batch, build, course_sd, perturb  # noqa: F401

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


def test_bf16_stored_linear_weights_give_the_autocast_loss(course_sd):
    model = perturb(build(course_sd, "gated_cross", "lora"))
    visual, ids, targets = batch()
    before = {n: p for n, p in model.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model.loss(visual, ids, targets)
        with StoredLinearWeights(model, torch.bfloat16):
            dtypes = {n: p.dtype for n, p in model.named_parameters()}
            stored = model.loss(visual, ids, targets)
    assert torch.equal(stored, reference)
    assert dtypes["decoder.h.0.mlp.c_fc.weight"] == torch.bfloat16       # frozen
    assert dtypes["decoder.wte.weight"] == torch.float32                  # the tied lm_head's table
    trainable = {n for n, p in before.items() if p.requires_grad}
    linear = {n for n in trainable if dtypes[n] == torch.bfloat16}        # trainable working copies
    assert linear and linear < trainable            # the LoRA factors are not Linear: not stored
    assert all(n.endswith((".weight", ".bias")) and "lora_" not in n for n in linear)
    after = dict(model.named_parameters())   # the fp32 originals are back, the same objects
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_stored_linear_weights_keep_shared_tensors_shared_and_put_everything_back():
    a, b, frozen = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.weight = a.weight   # one trainable tensor in two modules
    frozen.requires_grad_(False)
    model = torch.nn.Sequential(a, b, frozen)
    originals = list(model.parameters())
    with StoredLinearWeights(model, torch.bfloat16) as stored:
        assert a.weight is b.weight and a.weight.dtype == torch.bfloat16 and a.weight.requires_grad
        assert frozen.weight.dtype == torch.bfloat16 and not frozen.weight.requires_grad
        assert len(stored.masters) == 3   # a's weight and bias, b's bias
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.ones(2, 4)).sum().backward()
        stored.grads_to_masters()
        assert a.weight.grad is not None and originals[0].grad.dtype == torch.float32
        torch.testing.assert_close(originals[0].grad, a.weight.grad.float(), rtol=0, atol=0)
    assert list(model.parameters()) == originals and b.weight is a.weight
    with StoredLinearWeights(model, torch.bfloat16, trainable=False):
        assert a.weight.dtype == torch.float32 and frozen.weight.dtype == torch.bfloat16
    with StoredLinearWeights(model, None):
        assert all(p is q for p, q in zip(model.parameters(), originals))


def test_a_stored_tensor_used_directly_elsewhere_gets_both_gradients():
    """A trainable Linear weight also read by a module that is not a Linear: its master's gradient
    is the sum of both uses, as under plain autocast (up to bf16 rounding of the sum's order)."""
    class Direct(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear
            self.weight = linear.weight

        def forward(self, x):
            return self.linear(x) + x @ self.weight

    grads = []
    for store in (False, True):
        torch.manual_seed(0)
        model = Direct(torch.nn.Linear(4, 4))
        with StoredLinearWeights(model, torch.bfloat16 if store else None) as stored:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(torch.randn(3, 4)).float().square().sum().backward()
            stored.grads_to_masters()
        grads.append(model.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("variant", ["lora", "adapter"])
def test_bf16_stored_linear_weights_train_exactly_as_autocast(course_sd, variant):
    """training_steps under bf16 (Linear tensors stored bf16, fp32 masters updated by AdamW)
    takes the very steps of plain autocast training, which casts fp32 weights at every use."""
    data = pairs(8, seed=2)
    batches = [data.pairs[i:i + 4] for i in (0, 4, 8, 12)]
    config = TrainConfig(batch_size=4, lr=0.05, precision="bf16")
    cpu = torch.device("cpu")
    reference = perturb(build(course_sd, "gated_cross", variant))
    optimizer, params = make_optimizer(reference, config)
    expected = [train_step(reference, optimizer, params, b, data.tokens, WordTokenizer(), config,
                           cpu, config.lr).item() for b in batches]
    model = perturb(build(course_sd, "gated_cross", variant))
    masters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with training_steps(model, data.tokens, WordTokenizer(), config, cpu) as step:
        assert any(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
        losses = [step(b, config.lr).item() for b in batches]
    assert losses == expected
    trained = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            assert trained[name] is masters[name] and trained[name].dtype == torch.float32, name
            assert torch.equal(trained[name], p), name


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
                          tmp_path / "ckpt.safetensors", torch.device("cpu"), log=lambda *_: None)
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


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("group_by_image", [False, True])
def test_compiled_training_trains_the_same_model(course_sd, tmp_path, group_by_image):
    """train.compile: torch.compile's loss in reduce-overhead mode (on the CPU: inductor, the CUDA
    graphs skipped) with its caption widths padded to 8 gives eager training's losses and weights
    up to rounding, as one graph for batches with and without a repeated image, and the
    checkpoint keeps the model's own parameter names."""
    assert TrainConfig(compile="reduce-overhead").width_multiple == 8
    assert TrainConfig(compile="default").width_multiple == TrainConfig().width_multiple == 1
    if not group_by_image:   # the first epoch has batches with and without a repeated image
        first_epoch = pairs(8, 0).batches(4, True, random.Random(TrainConfig().seed))
        assert {len({row for row, _ in b}) < len(b) for b in first_epoch} == {False, True}
    runs = []
    for mode in ("none", "reduce-overhead"):
        model = build(course_sd, "gated_cross", "lora")
        config = TrainConfig(epochs=2, batch_size=4, lr=0.01, warmup_steps=2, val_images=4,
                             val_batch_size=4, compile=mode, group_by_image=group_by_image)
        counters.clear()
        history, _ = train(model, pairs(8, 0), pairs(4, 1), WordTokenizer(), config,
                           tmp_path / f"{mode}.safetensors", torch.device("cpu"), log=lambda *_: None)
        runs.append((history, model.trainable_state_dict()))
    assert counters["stats"]["unique_graphs"] == 1   # the compiled run's
    (eager, eager_state), (compiled, compiled_state) = runs
    for a, b in zip(eager, compiled):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    assert compiled_state.keys() == eager_state.keys()
    for name, tensor in eager_state.items():
        compiled_tensor = compiled_state[name]
        if name.endswith("cross.kv.bias"):
            # Only the values' half: the keys' bias has a zero gradient in exact arithmetic (it adds
            # a constant to all of a query's scores, which softmax ignores), so AdamW steps on
            # rounding noise there, which differs between compiled and eager code.
            tensor, compiled_tensor = tensor[DECODER.n_embd:], compiled_tensor[DECODER.n_embd:]
        torch.testing.assert_close(compiled_tensor, tensor, rtol=1e-3, atol=1e-5, msg=name)
    assert load_trainable(build(course_sd, "gated_cross", "lora"),
                          tmp_path / "reduce-overhead.safetensors")


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
        shared = batch_loss(model, captions, tokens, WordTokenizer(), config, cpu)
        assert tokens.reads == [[1, 0, 3]]
        input_ids, targets, _ = caption_batch([t for _, t in captions], EOT, config.max_caption_tokens)
        repeated = model.loss(data.tokens[[i for i, _ in captions]], input_ids, targets)
    torch.testing.assert_close(shared, repeated, rtol=1e-6, atol=0)


def test_features_stay_on_the_host_without_a_gpu():
    tokens = torch.zeros(3, 2, 4)
    assert on_device_if_fits(tokens, torch.device("cpu")) is tokens


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0), ("max_caption_tokens", 1),
                                          ("precision", "fp16"), ("val_images", -1), ("grad_clip", -1.0),
                                          ("lr", -1e-3), ("warmup_steps", -1), ("compile", "fast"),
                                          ("compile", False),    # YAML reads a bare off as False
                                          ("group_by_image", "yes")])
def test_bad_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=rf"train\.{field}="):
        TrainConfig(**{field: value})


def test_grad_clip_zero_means_no_clipping(course_sd):
    """grad_clip: 0 turns clipping off (clip_grad_norm_ with 0 would zero every gradient)."""
    from models.training import make_optimizer, train_step
    data = pairs(4, seed=3)
    after = []
    for clip in (0.0, 1e9):
        model = perturb(build(course_sd, "gated_cross", "lora"))
        config = TrainConfig(batch_size=4, grad_clip=clip, weight_decay=0.0)
        optimizer, params = make_optimizer(model, config)
        train_step(model, optimizer, params, data.pairs[:4], data.tokens, WordTokenizer(), config,
                   torch.device("cpu"), lr=1e-2)
        after.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    start = {n: p for n, p in perturb(build(course_sd, "gated_cross", "lora")).named_parameters()
             if p.requires_grad}
    assert all(torch.equal(after[0][n], after[1][n]) for n in start)
    assert any(not torch.equal(after[0][n], start[n]) for n in start)


def test_train_section_numbers_written_as_strings_are_read_as_numbers():
    from models.config import from_section
    config = from_section(TrainConfig, {"lr": "1e-3", "batch_size": "32", "epochs": 2.0}, "train")
    assert config.lr == 1e-3 and config.batch_size == 32 and config.epochs == 2
    assert isinstance(config.batch_size, int) and isinstance(config.epochs, int)
    for section, message in (({"lr": "fast"}, r"train\.lr='fast': expected a number"),
                             ({"epochs": 2.5}, r"train\.epochs=2\.5: expected a whole number"),
                             ({"batch_size": [64]}, r"train\.batch_size=\[64\]: expected a number")):
        with pytest.raises(ValueError, match=message):
            from_section(TrainConfig, section, "train")


def test_every_params_section_error_names_its_source():
    from models.config import from_section
    from models.errors import ParamsError
    from models.world import World
    for section, message in (
            (["lr", 1], r"^p\.yaml: train: expected a mapping of parameters, got list"),
            ({"epochs": 0}, r"^p\.yaml: train: train\.epochs=0: must be at least 1"),
            ({"precision": "fp8"}, r"^p\.yaml: train: train\.precision='fp8'")):
        with pytest.raises(ValueError, match=message):
            from_section(TrainConfig, section, "p.yaml: train")
    with pytest.raises(ParamsError, match=r"p\.yaml: world: missing parameter\(s\) "
                                          r"\['decoder_heads'"):
        World.from_params({"world": {"data_root": "d", "decoder": "x.bin", "encoder_json": "e",
                                     "vocab_bpe": "v", "clip": "c"}}, "p.yaml")


def test_an_unreadable_params_file_is_one_error_naming_it(tmp_path):
    """Every stage and hw3_1.sh read params through load_params: one ParamsError line, which
    run_stage and hw3_1 print instead of a traceback."""
    from models.config import load_params
    from models.errors import InputError, ParamsError, read_json
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
    from models.device import resolve_device
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
