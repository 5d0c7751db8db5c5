"""speed/: each switch of `train.speed` leaves training as it was, bit for bit (compile and
length_parts: up to rounding), on a tiny captioner on the CPU; the bf16 runs take the GPU's code path."""
import random
import shutil
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from captioning.checkpoint import load_trainable
from speed import SpeedConfig, StoredLinearWeights, on_device_if_fits
from training.loop import TrainConfig, batch_loss, make_optimizer, speedups, train, train_step
from tests.test_captioner import DECODER, batch, build, course_sd, perturb  # noqa: F401
from tests.test_training import QUIET, WordTokenizer, pairs

OFF = SpeedConfig(stored_weights=False, features_on_device=False, numpy_gather=False)


def run_steps(model, data, config, batches, lr=None):
    """The losses of training steps on `batches`, as train() takes them (on the CPU)."""
    cpu = torch.device("cpu")
    optimizer, params = make_optimizer(model, config)
    with speedups(model, data.tokens, config, cpu) as fast:
        return [train_step(model, optimizer, params, b, WordTokenizer(), config, cpu,
                           lr or config.lr, fast).item() for b in batches]


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
@pytest.mark.parametrize("switch", ["stored_weights", "numpy_gather", "features_on_device"])
def test_each_switch_trains_exactly_as_without_it(course_sd, variant, switch):
    """Under bf16 autocast, with the switch on and with every switch off: the very same losses
    and trained parameters (stored weights: bf16 working copies, fp32 masters updated by AdamW,
    against autocast casting fp32 weights at every use)."""
    data = pairs(8, seed=2)
    batches = [data.pairs[i:i + 4] for i in (0, 4, 8, 12)]
    runs = []
    for speed in (OFF, replace(OFF, **{switch: True})):
        config = TrainConfig(batch_size=4, lr=0.05, precision="bf16", speed=speed)
        model = perturb(build(course_sd, "gated_cross", variant))
        masters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        losses = run_steps(model, data, config, batches)
        trained = dict(model.named_parameters())
        assert all(trained[n] is p and p.dtype == torch.float32 for n, p in masters.items())
        runs.append((losses, masters))
    (off_losses, off), (on_losses, on) = runs
    assert on_losses == off_losses
    assert all(torch.equal(on[n], off[n]) for n in off)


@pytest.mark.parametrize("parts", [2, 3])
def test_length_parts_give_the_whole_batch_loss_and_gradients(course_sd, parts):
    """train.speed.length_parts: the batch as sub-batches of similar caption length, each padded to
    its own longest caption and weighted by its targets, gives the whole batch's loss and
    gradients up to fp32 rounding, with fewer padded positions. (Compared before the optimiser:
    AdamW turns rounding in near-zero gradients into full-size steps.)"""
    data = pairs(8, seed=2)   # captions of 3 and 2 words
    batch = data.pairs[:6]
    cpu = torch.device("cpu")
    results = []
    for n in (1, parts):
        model = perturb(build(course_sd, "gated_cross", "lora"))
        widths = []
        record = lambda visual, ids, targets, index=None: widths.append(ids.shape) or \
            model.loss(visual, ids, targets, index)
        rows = lambda indices: data.tokens[indices]
        loss = batch_loss(model, batch, rows, WordTokenizer(), TrainConfig(), cpu, record, parts=n)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads, sum(b * t for b, t in widths), len(widths)))
    (whole, whole_grads, whole_positions, _), (split, split_grads, split_positions, calls) = results
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max())
    assert calls == parts and split_positions < whole_positions


@pytest.mark.parametrize("speed", [{"length_parts": 0},
                                   {"length_parts": 2, "compile": "reduce-overhead"}])
def test_bad_length_parts_are_refused_by_name(speed):
    with pytest.raises(ValueError, match=r"train\.speed\.length_parts"):
        SpeedConfig(**speed)


def test_stored_weights_are_bf16_inside_the_run(course_sd):
    data = pairs(4, seed=1)
    config = TrainConfig(batch_size=4, precision="bf16")
    model = perturb(build(course_sd, "gated_cross", "lora"))
    with speedups(model, data.tokens, config, torch.device("cpu")):
        assert any(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("group_by_image", [False, True])
def test_compiled_training_trains_the_same_model(course_sd, tmp_path, group_by_image):
    """train.speed.compile: torch.compile's loss in reduce-overhead mode (on the CPU: inductor, the CUDA
    graphs skipped) with its caption widths padded to 8 gives eager training's losses and weights
    up to rounding, as one graph for batches with and without a repeated image, and the
    checkpoint keeps the model's own parameter names."""
    assert SpeedConfig(compile="reduce-overhead").width_multiple == 8
    assert SpeedConfig(compile="default").width_multiple == SpeedConfig().width_multiple == 1
    if not group_by_image:   # the first epoch has batches with and without a repeated image
        first_epoch = pairs(8, 0).batches(4, True, random.Random(TrainConfig().seed))
        assert {len({row for row, _ in b}) < len(b) for b in first_epoch} == {False, True}
    runs = []
    for mode in ("none", "reduce-overhead"):
        model = build(course_sd, "gated_cross", "lora")
        config = TrainConfig(epochs=2, batch_size=4, lr=0.01, warmup_steps=2, val_images=4,
                             val_batch_size=4, speed=SpeedConfig(compile=mode),
                             group_by_image=group_by_image)
        counters.clear()
        history, _ = train(model, pairs(8, 0), pairs(4, 1), WordTokenizer(), config,
                           tmp_path / f"{mode}.safetensors", torch.device("cpu"), log=QUIET)
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


def test_features_stay_on_the_host_without_a_gpu():
    tokens = torch.zeros(3, 2, 4)
    assert on_device_if_fits(tokens, torch.device("cpu")) is tokens




def test_a_loss_that_does_not_compile_trains_eagerly(course_sd, monkeypatch, capsys):
    """Where torch.compile fails at the first forward (inductor on the visual-prefix captioner,
    torch 2.11 on a GPU), one line says so and the steps are eager ones: the same losses."""
    import speed

    def failing_compile(fn, mode=None):
        def compiled(*args):
            raise RuntimeError("InductorError: AssertionError")
        return compiled
    monkeypatch.setattr(speed.torch, "compile", failing_compile)
    data = pairs(8, seed=2)
    batches = [data.pairs[i:i + 4] for i in (0, 4, 8)]
    losses = []
    for mode in ("none", "default"):
        config = TrainConfig(batch_size=4, speed=replace(OFF, compile=mode))
        losses.append(run_steps(perturb(build(course_sd, "visual_prefix", "lora")), data, config,
                                batches))
    assert losses[1] == losses[0]
    assert capsys.readouterr().err.count("torch.compile failed (RuntimeError: InductorError") == 1
