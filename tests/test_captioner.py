"""The captioner on a tiny decoder: every bridge x PEFT method (peft's table style), what each
method promises at initialisation, which tensors one optimiser step may touch, the loss layout,
trainable-only checkpoints, and the parameter budget at the course's real size.

What "unchanged at initialisation" means here, precisely:
- PEFT identity (LoRA with B = 0, bottleneck adapters with a zero `up`, the adaption prompt with
  zero gates): with ANY bridge, the captioner's logits equal those of the same captioner with
  method `none` (same bridge weights), bit for bit.
- Bridge identity (the gated cross-attention bridge, tanh(0) = 0): with method none, lora,
  adapter or adaption, the logits on text equal the frozen decoder's logits on the same text
  without any bridge, whatever the image, bit for bit.
Not promised, and asserted to differ so that this list stays true:
- prefix tuning: its keys/values join every softmax; even zero keys would take attention weight
  exp(0) from the text, so no initialisation leaves attention unchanged.
- prompt tuning: the soft tokens are real input tokens that the text attends to.
- the visual-prefix bridge: the projected image tokens are part of the sequence; there is no
  "text-only" forward of this model at all.
- the ungated cross bridge: its cross-attention output is added to the residual from step one.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from captioning.bridges import BRIDGES, BridgeConfig, QueryFormer
from captioning.captioner import Captioner, CaptionerConfig, build_on_meta
from captioning.checkpoint import load_captioner, load_trainable, read_checkpoint, save_trainable
from captioning.gpt2 import (GPT2, CheckpointError, GPT2Config, course_state_dict,
                         load_course_state_dict, weights_id)
from captioning.peft import PeftConfig
from captioning.tokenizer import caption_batch
from scripts.param_table import LIMIT, markdown, parameter_table

torch.set_num_threads(1)

DECODER = GPT2Config(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16)
EOT = 96
VISUAL_WIDTH, VISUAL_TOKENS = 24, 5
ALL_LORA_TARGETS = ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"]
VARIANTS = {   # name -> (PEFT method, its settings)
    "lora": ("lora", dict(rank=2)),  # default targets: c_attn q and v (MergedLinear)
    "lora_all": ("lora", dict(rank=2, targets=ALL_LORA_TARGETS, qkv=[True, True, True])),
    "adapter": ("adapter", dict(size=4)),
    "prefix_tuning": ("prefix_tuning", dict(length=3)),
    "prefix_mlp": ("prefix_tuning", dict(length=3, hidden=8)),
    "prompt_tuning": ("prompt_tuning", dict(length=3)),
    "adaption_prompt": ("adaption_prompt", dict(length=3)),
    "none": ("none", {}),
}
# bridge name -> (kind, settings): each kind on the image tokens, and on learned queries
QUERIES = dict(queries=4, query_layers=2, query_width=8)
BRIDGE_TABLE = {**{kind: (kind, {}) for kind in BRIDGES},
                **{f"{kind}+queries": (kind, QUERIES) for kind in BRIDGES}}
ZERO_INIT = ["lora", "lora_all", "adapter", "adaption_prompt"]  # promise PEFT identity at init
NOT_ZERO_INIT = ["prefix_tuning", "prefix_mlp", "prompt_tuning"]


@pytest.fixture(scope="module")
def course_sd():
    """The frozen decoder's weights in the course format, with non-trivial LayerNorms."""
    torch.manual_seed(1234)
    gpt = GPT2(DECODER)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "ln" in name else 0.1))
    return course_state_dict(gpt)


def fresh_decoder(sd):
    return load_course_state_dict(GPT2(DECODER), sd)


def config(bridge, variant, **bridge_kw):
    """bridge: a name of BRIDGE_TABLE; bridge_kw: more of its settings."""
    kind, settings = BRIDGE_TABLE[bridge]
    return CaptionerConfig(decoder=DECODER, visual_width=VISUAL_WIDTH, visual_tokens=VISUAL_TOKENS,
                           bridge=BridgeConfig.of(kind, **settings, **bridge_kw), peft=PeftConfig.of(*VARIANTS[variant][:1], **VARIANTS[variant][1]),
                           encoder_id="test-vit", tokenizer_id="test-bpe")


def build(sd, bridge, variant, seed=0, **bridge_kw):
    torch.manual_seed(seed)
    return Captioner(config(bridge, variant, **bridge_kw), fresh_decoder(sd))


def perturb(model, seed=1, scale=0.3):
    """Move every trainable tensor off its initialisation (zero gates, B = 0 ...), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def batch(seed=0, B=3, T=7):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(B, VISUAL_TOKENS, VISUAL_WIDTH, generator=g)
    ids = torch.randint(0, DECODER.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, DECODER.vocab_size, (B, T), generator=g)
    targets[:, -2:] = -100
    return visual, ids, targets


def logits_of(model, visual, ids):
    return model(model.context(visual), ids)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


TABLE = [(b, v) for b in BRIDGE_TABLE for v in VARIANTS]


@pytest.mark.parametrize("bridge,variant", TABLE)
def test_forward_backward_save_reload(course_sd, bridge, variant, tmp_path):
    model = perturb(build(course_sd, bridge, variant))
    visual, ids, targets = batch()
    logits = logits_of(model, visual, ids)
    assert logits.shape == (3, 7, DECODER.vocab_size) and torch.isfinite(logits).all()

    model.loss(visual, ids, targets).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:  # everything trainable is wired into the loss
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not any(n.startswith("decoder.") and "lora_" not in n and ".cross." not in n
                   and ".after_" not in n and ".extra_attention." not in n
                   for n in trainable_names(model))
    counts = model.parameter_counts()
    assert sum(t for t, _ in counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)

    path = tmp_path / "trainable.safetensors"
    save_trainable(model, path, extra={"step": 3})
    saved_config, tensors, extra = read_checkpoint(path)
    assert saved_config == model.config and extra == {"step": 3}
    assert set(tensors) == trainable_names(model) == set(model.trainable_state_dict())

    fresh = build(course_sd, bridge, variant, seed=99)
    with torch.no_grad():
        before = logits_of(fresh, visual, ids)
        assert not torch.allclose(before, logits.detach(), atol=1e-4)  # the reload has work to do
        assert load_trainable(fresh, path) == {"step": 3}
        torch.testing.assert_close(logits_of(fresh, visual, ids), logits.detach(), atol=0, rtol=0)
        fresh.eval(), model.eval()
        torch.testing.assert_close(logits_of(fresh, visual, ids), logits_of(model, visual, ids),
                                   atol=0, rtol=0)


def test_decoder_weights_id_is_the_frozen_weights_only(course_sd):
    """What a checkpoint records of its decoder: changed by any frozen weight, not by the bridge
    and PEFT modules attached to it, nor by training them."""
    plain = weights_id(fresh_decoder(course_sd))
    model = perturb(build(course_sd, "gated_cross", "lora"))
    assert weights_id(model.decoder) == plain
    other = dict(course_sd)
    key = sorted(k for k in other if k.endswith("ln_2.bias"))[0]
    other[key] = other[key] + 1e-3
    assert weights_id(fresh_decoder(other)) != plain


@pytest.mark.parametrize("bridge,variant", TABLE)
def test_one_optimiser_step_changes_only_trainable(course_sd, bridge, variant):
    model = perturb(build(course_sd, bridge, variant))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    # every parameter handed to AdamW (the careless way), with weight decay: the frozen ones have
    # no gradient, so AdamW must skip them entirely
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    visual, ids, targets = batch()
    model.loss(visual, ids, targets).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable_names(model)
    reported = sum(t for t, _ in model.parameter_counts().values())
    assert reported == sum(before[n].numel() for n in changed)
    for n, p in model.named_parameters():
        if n not in changed:
            assert torch.equal(p, before[n]), n
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    frozen_now = course_state_dict(model.decoder)  # the GPT-2 weights, still bit-identical
    assert all(torch.equal(frozen_now[k], course_sd[k]) for k in course_sd)


@pytest.mark.parametrize("bridge", BRIDGE_TABLE)
@pytest.mark.parametrize("variant", ZERO_INIT)
def test_zero_init_methods_leave_logits_unchanged(course_sd, bridge, variant):
    base = build(course_sd, bridge, "none")
    model = build(course_sd, bridge, variant, seed=5)
    with torch.no_grad():  # same bridge weights in both
        for name, t in base.trainable_state_dict().items():
            model.get_parameter(name).copy_(t)
    visual, ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(logits_of(model, visual, ids), logits_of(base, visual, ids))
        perturb(model)  # ...and the comparison can fail
        assert not torch.allclose(logits_of(model, visual, ids), logits_of(base, visual, ids))


@pytest.mark.parametrize("bridge", ["gated_cross", "gated_cross+queries"])
@pytest.mark.parametrize("variant", ["none"] + ZERO_INIT)
def test_gated_cross_bridge_starts_as_the_frozen_decoder(course_sd, bridge, variant):
    model = build(course_sd, bridge, variant)
    plain = fresh_decoder(course_sd)
    visual, ids, _ = batch()
    other_visual, _, _ = batch(seed=1)
    with torch.no_grad():
        text_only = plain(ids)
        assert torch.equal(logits_of(model, visual, ids), text_only)
        assert torch.equal(logits_of(model, other_visual, ids), text_only)  # the image is not seen yet
        model.decoder.h[0].cross.gate.fill_(0.5)
        assert not torch.allclose(logits_of(model, visual, ids), text_only)


def test_gate_init_sets_every_gate(course_sd):
    """gate_init 0 is Flamingo's zero start; another value opens every gate to tanh(gate_init)
    from the first step, so the image changes the logits at once."""
    model = build(course_sd, "gated_cross", "none", gate_init=1.0)
    gates = [b.cross.gate for b in model.decoder.h]
    assert all(torch.equal(g, torch.ones(1)) for g in gates)
    visual, ids, _ = batch()
    with torch.no_grad():
        assert not torch.allclose(logits_of(model, visual, ids), fresh_decoder(course_sd)(ids), atol=1e-3)
    with pytest.raises(TypeError):   # the ungated bridge has no gate to set
        BridgeConfig.of("cross", gate_init=1.0)


def test_queries_are_what_the_decoder_reads(course_sd):
    """With N queries the decoder reads N visual tokens whatever the image's number of tokens
    (computed once per image, in the context); without, the projected image tokens, and the
    bridge adds no module and no parameter name."""
    visual, _, _ = batch()
    for kind in BRIDGES:
        plain, queried = build(course_sd, kind, "none"), build(course_sd, f"{kind}+queries", "none")
        assert plain.query_former is None and isinstance(queried.query_former, QueryFormer)
        assert not any("query" in n for n, _ in plain.named_parameters())
        assert queried.visual_proj.net[0].in_features == QUERIES["query_width"]
        assert len(queried.query_former.blocks) == QUERIES["query_layers"]
        with torch.no_grad():
            ctx = queried.context(visual)
            read = ctx.prefix_embeds if kind == "visual_prefix" else ctx.visual
            assert read.shape == (3, QUERIES["queries"], DECODER.n_embd)
            longer = torch.cat([visual, visual[:, :2]], dim=1)   # more image tokens, same N
            assert queried.context(longer).n_sequences == 3
            read = queried.context(longer)
            assert (read.prefix_embeds if kind == "visual_prefix" else read.visual).shape[1] == 4
    with pytest.raises(ValueError, match="query_width=96"):
        BridgeConfig.of("cross", queries=4, query_width=96)


@pytest.mark.parametrize("bridge,variant", [("cross", "none"), ("visual_prefix", "none")]
                         + [("gated_cross", v) for v in NOT_ZERO_INIT])
def test_methods_that_do_not_promise_unchanged_logits(course_sd, bridge, variant):
    """See the module note: these change the frozen decoder's logits from the first step."""
    model = build(course_sd, bridge, variant)
    visual, ids, _ = batch()
    with torch.no_grad():
        assert not torch.allclose(logits_of(model, visual, ids), fresh_decoder(course_sd)(ids), atol=1e-3)


@pytest.mark.parametrize("bridge,variant", [(b, v) for b in BRIDGE_TABLE for v in ("none", "prompt_tuning", "prefix_tuning")])
def test_loss_layout_and_no_shift_by_prefixes(course_sd, bridge, variant):
    input_ids = torch.tensor([[EOT, 5, 6, 7, EOT], [EOT, 8, EOT, EOT, EOT]])
    targets = torch.tensor([[5, 6, 7, EOT, -100], [8, EOT, -100, -100, -100]])
    built_ids, built_targets, _ = caption_batch([[5, 6, 7], [8]], EOT, 16)
    assert torch.equal(built_ids, input_ids) and torch.equal(built_targets, targets)

    model = perturb(build(course_sd, bridge, variant))
    visual = batch(B=2)[0]
    with torch.no_grad():
        ctx = model.context(visual)
        logits = model(ctx, input_ids)
        assert logits.shape == (2, 5, DECODER.vocab_size)  # text positions only, whatever the prefix
        wanted = [(0, 0, 5), (0, 1, 6), (0, 2, 7), (0, 3, EOT), (1, 0, 8), (1, 1, EOT)]
        manual = -torch.stack([logits[b, t].log_softmax(-1)[y] for b, t, y in wanted]).mean()
        torch.testing.assert_close(model.loss(visual, input_ids, targets), manual, atol=1e-6, rtol=0)
        # logits[:, t] belong to input token t: they see token t and nothing after it
        for t in range(5):
            edited = input_ids.clone()
            edited[:, t] = (edited[:, t] + 1) % EOT
            out = model(ctx, edited)
            torch.testing.assert_close(out[:, :t], logits[:, :t], atol=1e-6, rtol=0)
            assert (out[:, t] - logits[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("bridge,variant", [(b, v) for b in BRIDGE_TABLE for v in ("lora", "prompt_tuning", "adapter")])
def test_captions_sharing_an_image_equal_the_image_repeated(course_sd, bridge, variant):
    """Training batches give each image once with the image of every caption (image_index): the
    loss and every gradient are those of the batch with each caption's image tokens repeated."""
    model = perturb(build(course_sd, bridge, variant)).double()
    images, ids, targets = batch(B=5)
    images = images[:3].double()
    image_index = torch.tensor([2, 0, 2, 1, 2])

    def loss_and_grads(*inputs):
        model.zero_grad()
        loss = model.loss(*inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    shared, shared_grads = loss_and_grads(images, ids, targets, image_index)
    repeated, repeated_grads = loss_and_grads(images[image_index], ids, targets)
    torch.testing.assert_close(shared, repeated, atol=1e-12, rtol=0)
    assert shared_grads.keys() == repeated_grads.keys()
    for name in shared_grads:
        torch.testing.assert_close(shared_grads[name], repeated_grads[name], atol=1e-12, rtol=0, msg=name)
    with torch.no_grad():  # the context follows its sequences through select and repeats
        ctx = model.context(images, image_index)
        picked = torch.tensor([4, 1])
        torch.testing.assert_close(model(ctx.select(picked), ids[picked]),
                                   model(model.context(images[image_index[picked]]), ids[picked]))
        assert ctx.select(torch.arange(5).repeat_interleave(2)).n_sequences == 10
    with pytest.raises(ValueError, match="5 captions, but an image_index of 4"):
        model.loss(images, ids, targets, image_index[:4])
    with pytest.raises(ValueError, match="5 captions, but 3 images and no image_index"):
        model.loss(images, ids, targets)
    with pytest.raises(ValueError, match="1-D tensor of image rows"):
        model.loss(images, ids, targets, image_index[:, None])


@pytest.mark.parametrize("bridge,variant", [("cross", "lora"), ("visual_prefix", "prefix_tuning"), ("gated_cross", "prompt_tuning"),
                                            ("visual_prefix+queries", "prefix_tuning"), ("gated_cross+queries", "lora")])
def test_cached_decoding_equals_full_forward(course_sd, bridge, variant):
    model = perturb(build(course_sd, bridge, variant)).eval()
    visual, ids, _ = batch()
    with torch.no_grad():
        ctx = model.context(visual)
        full = model(ctx, ids)
        cache = model.new_cache(3)
        parts = [model(ctx, ids[:, :3], cache)] + [model(ctx, ids[:, t:t + 1], cache) for t in range(3, 7)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
        # beam search: duplicate each image, reorder the cache, continue
        cache = model.new_cache(6)
        wide = ctx.select(torch.arange(3).repeat_interleave(2))
        first = model(wide, ids.repeat_interleave(2, 0)[:, :4], cache)
        order = torch.tensor([1, 0, 3, 2, 5, 4])
        cache.reorder(order)
        step = model(wide, ids.repeat_interleave(2, 0)[order][:, 4:5], cache)
        torch.testing.assert_close(step[:, 0], full.repeat_interleave(2, 0)[order][:, 4], atol=1e-5, rtol=0)
        assert first.shape[1] == 4


@pytest.mark.parametrize("bridge", ["visual_prefix", "visual_prefix+queries"])
@pytest.mark.parametrize("variant", ["none", "prefix_tuning", "prompt_tuning"])
def test_visual_key_span_points_at_the_image_tokens(course_sd, bridge, variant):
    """Self-attention keys are [prefix-tuning P | image V (or its N queries) | soft prompt | text]."""
    model = perturb(build(course_sd, bridge, variant))
    n_visual = QUERIES["queries"] if model.query_former is not None else VISUAL_TOKENS
    visual, ids, _ = batch()
    with torch.no_grad():
        ctx = model.context(visual)
        _, attentions = model(ctx, ids, capture=True)
        start, end = model.visual_key_span()
        assert end - start == n_visual
        n_prefix = 3 if variant == "prefix_tuning" else 0
        n_prompt = 3 if variant == "prompt_tuning" else 0
        assert start == n_prefix
        self_att = attentions[0][0]
        assert self_att.shape[-1] == n_prefix + n_visual + n_prompt + ids.size(1)
        # the span's keys are the image's: in layer 0, another image changes the last text
        # token's attention to exactly those keys, relative to the others (softmax renormalises)
        other = visual.clone()
        other[0] += 1.0
        _, other_att = model(model.context(other), ids, capture=True)
        outside = torch.ones(self_att.shape[-1], dtype=torch.bool)
        outside[start:end] = False

        def relative(att):
            row = att[0, :, -1]  # image 0, all heads, the last query sees every key
            return row.log() - row[:, outside].sum(-1, keepdim=True).log()

        a, b = relative(self_att), relative(other_att[0][0])
        torch.testing.assert_close(a[:, outside], b[:, outside], atol=1e-5, rtol=0)
        assert (a[:, start:end] - b[:, start:end]).abs().amax(0).min() > 1e-4
    assert build(course_sd, "cross", "prefix_tuning").visual_key_span() is None


# --- checkpoints -------------------------------------------------------------------------------

@pytest.fixture
def lora_checkpoint(course_sd, tmp_path):
    model = perturb(build(course_sd, "cross", "lora_all"))
    path = tmp_path / "lora.safetensors"
    save_trainable(model, path)
    return model, path


def test_lora_loaded_before_eval_gives_the_same_logits(course_sd, lora_checkpoint):
    model, path = lora_checkpoint
    visual, ids, _ = batch()
    with torch.no_grad():
        train_logits = logits_of(model, visual, ids)
        model.eval()
        assert torch.equal(logits_of(model, visual, ids), train_logits)
        fresh = build(course_sd, "cross", "lora_all", seed=7)
        load_trainable(fresh, path)
        frozen = fresh.decoder.h[0].attn.c_attn.weight.clone()
        fresh.eval()
        assert torch.equal(logits_of(fresh, visual, ids), train_logits)
        for _ in range(3):  # train()/eval() cycles never fold B @ A into the frozen weight
            fresh.train(), fresh.eval()
        assert torch.equal(fresh.decoder.h[0].attn.c_attn.weight, frozen)
        assert torch.equal(logits_of(fresh, visual, ids), train_logits)


def test_load_captioner_from_files(course_sd, lora_checkpoint, tmp_path):
    model, path = lora_checkpoint
    decoder_bin = tmp_path / "decoder_model.bin"
    torch.save(course_sd, decoder_bin)
    loaded, extra = load_captioner(path, decoder_bin)
    assert not loaded.training and extra == {}
    visual, ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(logits_of(loaded, visual, ids), logits_of(model, visual, ids))
    other = copy.deepcopy(course_sd)
    other["wpe.weight"] = other["wpe.weight"][:16]
    torch.save(other, decoder_bin)
    with pytest.raises(CheckpointError, match=r"decoder_model.bin: this decoder does not fit .*block_size: 32 != 16"):
        load_captioner(path, decoder_bin)


@pytest.mark.parametrize("bridge", ["gated_cross+queries", "visual_prefix+queries"])
def test_load_captioner_rebuilds_the_queries(course_sd, bridge, tmp_path):
    """What hw3_2.sh loads: the checkpoint's config alone rebuilds the queries around the decoder."""
    model = perturb(build(course_sd, bridge, "lora"))
    path, decoder_bin = tmp_path / "q.safetensors", tmp_path / "decoder_model.bin"
    save_trainable(model, path)
    torch.save(course_sd, decoder_bin)
    assert any(n.startswith("query_former.") for n in load_file(str(path)))
    loaded, _ = load_captioner(path, decoder_bin)
    assert loaded.config.bridge.settings.queries == QUERIES["queries"]
    visual, ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(logits_of(loaded, visual, ids), logits_of(model.eval(), visual, ids))


@pytest.mark.parametrize("change,field", [
    (dict(variant="lora", bridge="cross", rank=3), "peft.lora.rank: 2 != 3"),
    (dict(variant="lora_all", bridge="gated_cross"), "bridge.kind: 'cross' != 'gated_cross'"),
    (dict(variant="adapter", bridge="cross"), "peft.method: 'lora' != 'adapter'"),
])
def test_checkpoint_of_another_config_is_refused(course_sd, lora_checkpoint, change, field):
    _, path = lora_checkpoint
    change = dict(change)
    cfg = config(change.pop("bridge"), change.pop("variant"))
    if "rank" in change:
        cfg.peft.lora.rank = change.pop("rank")
        cfg.peft.lora.targets, cfg.peft.lora.qkv = ALL_LORA_TARGETS, [True, True, True]
    model = Captioner(cfg, fresh_decoder(course_sd))
    with pytest.raises(CheckpointError) as e:
        load_trainable(model, path)
    assert str(path) in str(e.value) and field in str(e.value), str(e.value)


def test_checkpoint_of_another_visual_width_is_refused(course_sd, lora_checkpoint):
    _, path = lora_checkpoint
    cfg = config("cross", "lora_all")
    cfg.visual_width = 32
    with pytest.raises(CheckpointError, match="visual_width: 24 != 32"):
        load_trainable(Captioner(cfg, fresh_decoder(course_sd)), path)


def test_checkpoint_bytes_do_not_change_between_saves(course_sd, tmp_path):
    """One metadata key: safetensors writes a metadata map in hash order, so with two keys the
    same checkpoint came out in two byte layouts (DVC then sees a changed output)."""
    model = perturb(build(course_sd, "gated_cross", "lora"))
    files = [tmp_path / f"ckpt{i}.safetensors" for i in range(8)]
    for f in files:
        save_trainable(model, f, extra={"epoch": 3, "val_cider": 0.5})
    assert len({f.read_bytes() for f in files}) == 1


def test_checkpoint_with_the_earlier_two_metadata_keys_still_loads(course_sd, lora_checkpoint, tmp_path):
    model, path = lora_checkpoint
    config, tensors, extra = read_checkpoint(path)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"config": json.dumps(config.to_dict()), "extra": json.dumps(extra)})
    assert read_checkpoint(old)[0] == config and read_checkpoint(old)[2] == extra


def rewrite(path, edit):
    """Re-save a checkpoint with its metadata but edited tensors."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


LORA_A = "decoder.h.1.attn.c_attn.lora_A"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(LORA_A), f"missing ['{LORA_A}']"),
    (lambda t: t.update({"decoder.h.0.attn.c_attn.weight": torch.zeros(48, 16)}),
     "unexpected ['decoder.h.0.attn.c_attn.weight']"),  # a frozen tensor has no place in it
    (lambda t: t.update({LORA_A: torch.zeros(4, 16)}), f"'{LORA_A}' has shape (4, 16), the model expects (6, 16)"),
])
def test_checkpoint_with_wrong_tensors_is_refused(course_sd, lora_checkpoint, edit, message):
    _, path = lora_checkpoint
    rewrite(path, edit)
    model = build(course_sd, "cross", "lora_all")
    with pytest.raises(CheckpointError) as e:
        load_trainable(model, path)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_unreadable_checkpoints_are_refused(course_sd, lora_checkpoint, tmp_path):
    _, path = lora_checkpoint
    model = build(course_sd, "cross", "lora_all")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{truncated}: not a readable safetensors"):
        load_trainable(model, truncated)
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    with pytest.raises(CheckpointError, match=f"{bare}: no model config"):
        load_trainable(model, bare)
    pickled = tmp_path / "pickled.pt"
    torch.save(model.trainable_state_dict(), pickled)
    with pytest.raises(CheckpointError, match=f"{pickled}: not a readable safetensors"):
        load_trainable(model, pickled)
    with pytest.raises(CheckpointError, match="no such file"):
        load_trainable(model, tmp_path / "absent.safetensors")
    bad_config = tmp_path / "bad_config.safetensors"
    cfg = model.config.to_dict()
    cfg["peft"]["lora_rnak"] = 4
    save_file({"x": torch.zeros(2)}, str(bad_config), metadata={"config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match=f"{bad_config}: its config cannot be read.*lora_rnak"):
        load_trainable(model, bad_config)
    bad_extra = tmp_path / "bad_extra.safetensors"
    save_file({"x": torch.zeros(2)}, str(bad_extra),
              metadata={"config": json.dumps(model.config.to_dict()), "extra": "{not json"})
    with pytest.raises(CheckpointError, match=f"{bad_extra}: its config cannot be read"):
        load_trainable(model, bad_extra)


# --- construction ------------------------------------------------------------------------------

def test_a_decoder_serves_one_captioner_only(course_sd):
    decoder = fresh_decoder(course_sd)
    Captioner(config("cross", "lora"), decoder)
    with pytest.raises(ValueError, match="already carries a bridge or PEFT modules"):
        Captioner(config("gated_cross", "adapter"), decoder)
    decoder = fresh_decoder(course_sd)
    Captioner(config("visual_prefix", "prefix_tuning"), decoder)  # a hook in the decoder
    with pytest.raises(ValueError, match="past_kv"):
        Captioner(config("visual_prefix", "none"), decoder)


def test_decoder_of_another_size_is_refused(course_sd):
    cfg = config("cross", "none")
    cfg.decoder = GPT2Config(vocab_size=97, block_size=32, n_layer=3, n_head=2, n_embd=16)
    with pytest.raises(ValueError, match="n_layer: 3 != 2"):
        Captioner(cfg, fresh_decoder(course_sd))


def test_cross_attention_in_chosen_layers_only(course_sd):
    model = build(course_sd, "gated_cross", "none", layers=[1])
    assert model.decoder.h[0].cross is None and model.decoder.h[1].cross is not None
    with pytest.raises(ValueError, match=r"bridge layers \[2\] outside the decoder's 2 blocks"):
        build(course_sd, "cross", "none", layers=[2])
    # written in any order or twice: block order, as decoding captures the attention rows
    assert BridgeConfig.of("cross", layers=[1, 0, 1]).cross_layers(2) == [0, 1]
    assert BridgeConfig.of("cross", layers=-1).cross_layers(2) == [1]


@pytest.mark.parametrize("enable", [[True, False, True], [True, True, True], [False, True, False]])
def test_low_rank_lora_forward_equals_loralibs(enable):
    """captioning.peft.lora.MergedLinear only computes loralib's update another way: (x A^T) B^T per
    enabled part instead of the dense B@A placed by a boolean mask. Same outputs and gradients."""
    import loralib
    from captioning.peft.lora import MergedLinear
    torch.manual_seed(0)
    layer = MergedLinear(12, 18, r=2, lora_alpha=3, enable_lora=enable, merge_weights=False).double()
    with torch.no_grad():  # float64: the two orders of summation agree to ~1e-15
        layer.lora_B.normal_()  # B starts at zero: the update would vanish
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for forward in (MergedLinear.forward, loralib.MergedLinear.forward):
        out = forward(layer, x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)])
        for t in (x, layer.lora_A, layer.lora_B):
            t.grad = None
    torch.testing.assert_close(outs[0], outs[1])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)
    disabled = [i for i, on in enumerate(enable) if not on]
    plain = F.linear(x, layer.weight, layer.bias).detach().view(3, 5, 3, 6)
    assert torch.equal(outs[0].view(3, 5, 3, 6)[:, :, disabled], plain[:, :, disabled])
    assert not torch.allclose(outs[0], plain.view(3, 5, 18))
    torch.testing.assert_close(layer(x.detach()[0]), outs[0][0])   # one sequence, [tokens, width]


# --- the budget at real size -------------------------------------------------------------------

GPT2_SMALL_PARAMETERS = 124_439_808  # wte 50257x768 + wpe 1024x768 + 12 blocks + ln_f (lm_head tied)


def test_every_default_variant_fits_the_course_budget_at_real_size():
    rows = parameter_table()
    assert {(r["bridge"], r["queries"], r["method"]) for r in rows} == {
        (b, q, m) for b in BRIDGES for q in (0, 32) for m, _ in VARIANTS.values()}
    for r in rows:
        assert r["trainable"] < LIMIT, r
        assert r["frozen"] == GPT2_SMALL_PARAMETERS, r
    by = {(r["bridge"], r["method"]): r for r in rows if not r["queries"]}
    C, D, L = 768, 1024, 12
    linear = lambda i, o: i * o + o
    cross_block = 2 * C + linear(C, C) + linear(C, 2 * C) + linear(C, C)  # ln, q, kv, proj
    assert by["cross", "none"]["trainable"] == L * cross_block + linear(D, C) + 2 * C
    assert by["gated_cross", "none"]["trainable"] == by["cross", "none"]["trainable"] + L
    prefix = "visual_prefix"
    assert by[prefix, "none"]["trainable"] == linear(D, 2 * C) + linear(2 * C, C)
    assert by[prefix, "lora"]["parts"]["lora"] == L * (2 * 8 * C + 2 * C * 8)  # q and v, rank 8
    assert by[prefix, "adapter"]["parts"]["adapters"] == L * 2 * (linear(C, 64) + linear(64, C))
    assert by[prefix, "prefix_tuning"]["parts"]["prefix tuning"] == 10 * L * 2 * C
    assert by[prefix, "prompt_tuning"]["parts"]["prompt tuning"] == 10 * C
    assert by[prefix, "adaption_prompt"]["parts"]["adaption prompt"] == L * (10 * C + 12)
    # the queries: 32 x 256, then 2 layers of [self-attention, cross-attention to the 1024-wide
    # image tokens, MLP], a final norm; the projection then reads 256-wide queries
    W = 256
    query_layer = 2 * W + linear(W, 3 * W) + linear(W, W) + 2 * W + linear(W, W) + linear(D, 2 * W) \
        + linear(W, W) + 2 * W + linear(W, 4 * W) + linear(4 * W, W)
    queried = {(r["bridge"], r["method"]): r for r in rows if r["queries"]}
    assert queried["cross", "none"]["parts"]["query former"] == 32 * W + 2 * query_layer + 2 * W
    assert queried["cross", "none"]["parts"]["visual projection"] == linear(W, C) + 2 * C
    table = markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "**NO**" not in table


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("bridge,variant", [(b, v) for b in BRIDGE_TABLE for v in VARIANTS])
def test_builds_under_a_default_device(bridge, variant, device):
    with torch.device(device):
        model = Captioner(config(bridge, variant), GPT2(DECODER))
    assert all(p.device.type == device for p in model.parameters())
    if device != "meta":
        visual, ids, targets = (t.to(device) for t in batch())
        model.loss(visual, ids, targets).backward()


def test_soft_prompt_starts_from_vocabulary_rows(course_sd):
    model = build(course_sd, "cross", "prompt_tuning")
    wte = model.decoder.wte.weight
    for row in model.soft_prompt.embeds:
        assert (wte == row).all(dim=1).any()


def test_meta_build_allocates_nothing():
    model = build_on_meta(config("cross", "lora_all"))
    assert all(p.is_meta for p in model.parameters())
