"""Decoding on tiny captioners: the cached batched decoder against the naive reference, beam
search against greedy, sampling, attention capture, and CLIP-safe caption text."""
import dataclasses
import itertools

import clip
import pytest
import torch
import torch.nn.functional as F
from tokenizers.pre_tokenizers import ByteLevel

from captioning.bridges import BRIDGES, BridgeConfig
from captioning.captioner import Captioner, CaptionerConfig
from captioning.decoding import (DecodeConfig, cap_for_clip, caption_features, caption_text,
                             clip_token_count, filter_logits, generate)
from captioning.gpt2 import GPT2, GPT2Config
from captioning.peft import METHODS, PeftConfig
from common.params import from_section
from captioning.tokenizer import EOT, Tokenizer

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and much faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


VOCAB = 48
EOT_ID = VOCAB - 1
V_TOKENS, V_WIDTH = 5, 12


SETTINGS = {"lora": dict(rank=4), "adapter": dict(size=8), "prefix_tuning": dict(length=3),
            "prompt_tuning": dict(length=3), "adaption_prompt": dict(length=3)}


def tiny_model(bridge="gated_cross", peft="lora", seed=0, vocab=VOCAB, cross_layers=(), queries=0):
    """queries: learned queries (2 layers, 16 wide) between the image tokens and the bridge."""
    torch.manual_seed(seed)
    decoder = GPT2(GPT2Config(vocab_size=vocab, block_size=64, n_layer=2, n_head=2, n_embd=32))
    query_settings = dict(queries=queries, query_layers=2, query_width=16)
    config = CaptionerConfig(
        decoder=decoder.config, visual_width=V_WIDTH, visual_tokens=V_TOKENS,
        bridge=BridgeConfig.of(bridge, **query_settings, **({} if bridge == "visual_prefix" else
                                                             {"layers": list(cross_layers)})),
        peft=PeftConfig.of(peft, **SETTINGS.get(peft, {})))
    model = Captioner(config, decoder)
    # Move every weight, zero-initialised ones (gates, lora_B, adapter up) included, well away
    # from its initial value, so that the bridge and the PEFT method change the outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.4)
        decoder.wte.weight[vocab - 1] *= 0.3  # make the end token rarer: captions of some length
    return model.eval()


def images(n=4, seed=1):
    return torch.randn(n, V_TOKENS, V_WIDTH, generator=torch.Generator().manual_seed(seed))


def teacher_forced_logprob(model, visual, tokens):
    """Sum of log p(tokens) given the image, in one plain forward pass."""
    ids = torch.tensor([[EOT_ID] + tokens[:-1]])
    with torch.no_grad():
        logits = model(model.context(visual[None]), ids)[0]
    return F.log_softmax(logits.float(), -1).gather(1, torch.tensor(tokens)[:, None]).sum().item()


GREEDY = DecodeConfig(method="greedy", max_new_tokens=12)


@pytest.mark.parametrize("bridge,peft", list(itertools.product(BRIDGES, METHODS)))
def test_cached_batched_greedy_equals_naive(bridge, peft):
    model, visual = tiny_model(bridge, peft), images()
    cached = generate(model, visual, GREEDY, EOT_ID)
    naive = generate(model, visual, GREEDY, EOT_ID, cached=False)
    assert [h.tokens for h in cached] == [h.tokens for h in naive]
    for c, n in zip(cached, naive):
        assert c.logprob == pytest.approx(n.logprob, abs=1e-4)
        assert c.ended == (c.tokens[-1] == EOT_ID)
    # not degenerate: the image changes the caption, and captions have several tokens
    assert len({tuple(h.tokens) for h in cached}) > 1
    assert max(len(h.tokens) for h in cached) > 3
    # rows of the batch do not leak into each other: each image alone decodes the same
    assert generate(model, visual[2:3], GREEDY, EOT_ID)[0].tokens == cached[2].tokens


@pytest.mark.parametrize("bridge,peft", [("cross", "lora"), ("gated_cross", "prefix_tuning"),
                                         ("visual_prefix", "prompt_tuning"), ("visual_prefix", "lora")])
def test_cached_decoding_with_queries_equals_naive(bridge, peft):
    """Learned queries instead of the image tokens: the cached batched decoder gives the naive
    one's ids (greedy and beam), and runs the queries once per image per decode."""
    model, visual = tiny_model(bridge, peft, queries=3), images()
    calls = []
    model.query_former.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    for config in (GREEDY, DecodeConfig(method="beam", beam_size=3, max_new_tokens=10)):
        calls.clear()
        cached = generate(model, visual, config, EOT_ID)
        assert calls == [len(visual)]
        naive = generate(model, visual, config, EOT_ID, cached=False)
        assert [h.tokens for h in cached] == [h.tokens for h in naive]
        for c, n in zip(cached, naive):
            assert c.logprob == pytest.approx(n.logprob, abs=1e-4)
    assert len({tuple(h.tokens) for h in cached}) > 1   # the image (through the queries) matters


@pytest.mark.parametrize("bridge,peft", [("cross", "prefix_tuning"), ("visual_prefix", "prompt_tuning"),
                                         ("gated_cross", "adaption_prompt"), ("visual_prefix", "lora")])
def test_cached_beam_equals_naive_beam(bridge, peft):
    model, visual = tiny_model(bridge, peft), images(3)
    config = DecodeConfig(method="beam", beam_size=3, max_new_tokens=10)
    cached = generate(model, visual, config, EOT_ID)
    naive = generate(model, visual, config, EOT_ID, cached=False)
    assert [h.tokens for h in cached] == [h.tokens for h in naive]


def test_logprob_is_the_model_score_of_the_tokens():
    model, visual = tiny_model("cross", "adapter"), images(3)
    for config in (GREEDY, DecodeConfig(method="beam", beam_size=4, max_new_tokens=12)):
        for i, h in enumerate(generate(model, visual, config, EOT_ID)):
            assert h.logprob == pytest.approx(teacher_forced_logprob(model, visual[i], h.tokens),
                                              abs=1e-4)


@pytest.mark.parametrize("bridge,peft", [("gated_cross", "lora"), ("visual_prefix", "prefix_tuning"),
                                         ("cross", "none")])
def test_beam_size_one_is_greedy(bridge, peft):
    model, visual = tiny_model(bridge, peft), images(5)
    greedy = generate(model, visual, GREEDY, EOT_ID)
    for lp in (0.0, 1.0):
        beam = generate(model, visual, DecodeConfig(method="beam", beam_size=1, length_penalty=lp,
                                                    max_new_tokens=12), EOT_ID)
        assert [h.tokens for h in beam] == [h.tokens for h in greedy]


def test_beam_wider_than_the_vocabulary_is_refused():
    model, visual = tiny_model(vocab=4), images(2)
    beam = generate(model, visual, DecodeConfig(method="beam", beam_size=3, max_new_tokens=5), 3)
    assert len(beam) == 2   # 3 beams, 3 tokens besides the end token: enough
    with pytest.raises(ValueError, match="beam_size=4 needs a vocabulary of more than 4 tokens"):
        generate(model, visual, DecodeConfig(method="beam", beam_size=4, max_new_tokens=5), 3)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_larger_beams_score_at_least_greedy(length_penalty):
    model, visual = tiny_model("gated_cross", "lora", seed=3), images(8, seed=5)
    greedy = generate(model, visual, GREEDY, EOT_ID)
    better = 0
    for k in (2, 5):
        config = DecodeConfig(method="beam", beam_size=k, length_penalty=length_penalty,
                              max_new_tokens=12)
        for g, b in zip(greedy, generate(model, visual, config, EOT_ID)):
            assert b.score(length_penalty) >= g.score(length_penalty) - 1e-5
            better += b.score(length_penalty) > g.score(length_penalty) + 1e-5
    assert better > 0, "beam search never found anything better than greedy: test is vacuous"


def test_min_new_tokens_forces_the_length():
    model, visual = tiny_model(), images(3)
    config = DecodeConfig(method="greedy", max_new_tokens=9, min_new_tokens=9)
    for cached in (True, False):
        for h in generate(model, visual, config, EOT_ID, cached=cached):
            assert len(h.tokens) == 9 and EOT_ID not in h.tokens
    beam = DecodeConfig(method="beam", beam_size=3, max_new_tokens=9, min_new_tokens=9)
    assert all(len(h.tokens) == 9 for h in generate(model, visual, beam, EOT_ID))


def test_sampling_is_reproducible_and_top1_is_greedy():
    model, visual = tiny_model("visual_prefix", "adapter"), images(4)
    sample = lambda **kw: [h.tokens for h in generate(
        model, visual, DecodeConfig(method="sample", max_new_tokens=12, **kw), EOT_ID)]
    greedy = [h.tokens for h in generate(model, visual, GREEDY, EOT_ID)]
    assert sample(seed=7) == sample(seed=7)
    assert sample(seed=7) != sample(seed=8)
    assert sample(seed=7) != greedy
    assert sample(top_k=1, seed=3) == greedy
    assert sample(top_p=1e-6, seed=3) == greedy
    assert sample(temperature=1e-4, seed=3) == greedy
    # the naive reference samples from the same distributions: top-k 1 is greedy there too
    naive = generate(model, visual, DecodeConfig(method="sample", top_k=1, max_new_tokens=12),
                     EOT_ID, cached=False)
    assert [h.tokens for h in naive] == greedy


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, True, False], [False, False, True, True]]
    kept = filter_logits(logits, top_p=0.6).isfinite()
    # row 0: p = .09 .67 .24 .03 -> the 0.67 token alone reaches 0.6
    assert kept.tolist()[0] == [False, True, False, False]
    # row 1: p = .005 .005 .73 .27 -> top_p 0.9 needs both large ones
    kept = filter_logits(logits, top_p=0.9).isfinite()
    assert kept.tolist()[1] == [False, False, True, True]
    assert torch.equal(filter_logits(logits), logits)


@pytest.mark.parametrize("bridge,layers", [("cross", ()), ("gated_cross", (1,))])
def test_captured_cross_attention_is_a_distribution_over_image_tokens(bridge, layers):
    model, visual = tiny_model(bridge, "lora", cross_layers=layers), images(3)
    n_layers = len(layers) or 2
    for config in (GREEDY, DecodeConfig(method="beam", beam_size=3, max_new_tokens=12)):
        cached = generate(model, visual, config, EOT_ID, capture=True)
        naive = generate(model, visual, config, EOT_ID, capture=True, cached=False)
        for c, n in zip(cached, naive):
            assert c.attention.shape == (len(c.tokens), n_layers, 2, V_TOKENS)
            assert torch.allclose(c.attention.sum(-1), torch.ones(()), atol=1e-5)
            assert c.tokens == n.tokens
            # float32 rounding of differently shaped products, sharpened by the softmax
            torch.testing.assert_close(c.attention, n.attention, atol=1e-4, rtol=1e-4)


def one_pass_attention(model, visual, tokens):
    """The image attention of each generated token, from ONE teacher-forced forward over
    [start, tokens[:-1]]: row t is what the step that generated tokens[t] attended to. Written
    out from the forward's own capture, independently of decoding's bookkeeping."""
    ids = torch.tensor([[EOT_ID] + tokens[:-1]])
    ctx = model.context(visual[None])
    with torch.no_grad():
        _, captured = model(ctx, ids, capture=True)
    if model.config.bridge.kind != "visual_prefix":   # cross-attention: [1, heads, T, V] per block
        return torch.stack([torch.stack([cross[0, :, t] for _, cross in captured if cross is not None])
                            for t in range(ids.size(1))])
    # self-attention keys: [prefix-tuning keys | visual tokens | soft prompt | text]; queries:
    # [visual tokens | soft prompt | text]
    start = 3 if model.config.peft.method == "prefix_tuning" else 0
    n_prefix = ctx.prefix_embeds.size(1)
    return torch.stack([torch.stack([self_att[0, :, n_prefix + t, start:start + V_TOKENS]
                                     for self_att, _ in captured])
                        for t in range(ids.size(1))])


@pytest.mark.parametrize("bridge,peft,eot_boost", [
    ("gated_cross", "lora", 10), ("cross", "adaption_prompt", 4), ("visual_prefix", "prefix_tuning", 10),
    ("visual_prefix", "prompt_tuning", 10)])
def test_captured_attention_is_the_generating_steps_own(bridge, peft, eot_boost):
    """Every token's map is the attention of the step that generated it, in the beam that won
    (not another beam's, not the next step's), over the image's keys only (not prefix-tuning's
    keys or a soft prompt), whether or not its caption ended early."""
    model, visual = tiny_model(bridge, peft), images(4)
    with torch.no_grad():   # a likelier end token, so that the captions end at varied steps
        model.decoder.wte.weight[EOT_ID] *= eot_boost
    for config in (GREEDY, DecodeConfig(method="beam", beam_size=3, max_new_tokens=12)):
        hyps = generate(model, visual, config, EOT_ID, capture=True)
        assert len({len(h.tokens) for h in hyps}) > 1
        for image, h in zip(visual, hyps):
            torch.testing.assert_close(h.attention, one_pass_attention(model, image, h.tokens),
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("peft", ["prefix_tuning", "prompt_tuning", "none"])
def test_captured_prefix_attention_shape(peft):
    model, visual = tiny_model("visual_prefix", peft), images(3)
    cached = generate(model, visual, GREEDY, EOT_ID, capture=True)
    naive = generate(model, visual, GREEDY, EOT_ID, capture=True, cached=False)
    for c, n in zip(cached, naive):
        assert c.attention.shape == (len(c.tokens), 2, 2, V_TOKENS)
        s = c.attention.sum(-1)
        assert (c.attention >= 0).all() and (s <= 1 + 1e-5).all() and (s > 0).all()
        assert torch.allclose(c.attention, n.attention, atol=1e-5)
    assert generate(model, visual, GREEDY, EOT_ID)[0].attention is None


def test_captions_are_capped_to_clip_context():
    long = " ".join(["a photo of a red square next to a blue circle"] * 12) + "."
    assert clip_token_count(long) > 77
    capped = cap_for_clip(long)
    assert clip_token_count(capped) <= 77
    clip.tokenize(capped)  # must not raise
    assert long.startswith(capped) and clip_token_count(capped + " circle") > 77 - 1
    assert len(capped.split()) > 50  # whole words, as many as fit
    short = "a red square."
    assert cap_for_clip(short) == short
    blob = "x" * 2000  # one word longer than the context: cut by characters
    capped = cap_for_clip(blob)
    assert 0 < len(capped) and clip_token_count(capped) <= 77
    clip.tokenize(capped)


def byte_tokenizer():
    """A 257-token byte-level vocabulary in GPT-2's format: the 256 bytes and the end token."""
    encoder = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    encoder[EOT] = len(encoder)
    return Tokenizer(encoder, [])


def test_caption_text_and_caption_features():
    tok = byte_tokenizer()
    assert caption_text(tok, tok.encode("  a cat. ") + [tok.eot_id]) == "a cat."
    # one caption stays one line for the PTBTokenizer, whatever line breaks were generated
    assert caption_text(tok, tok.encode("a\ncat\r\non \u2028 a\x85mat")) == "a cat on a mat"
    assert clip_token_count(caption_text(tok, tok.encode("word " * 200))) <= 77

    model = tiny_model("gated_cross", "lora", vocab=tok.vocab_size)
    visual = images(5)
    config = DecodeConfig(method="beam", beam_size=2, max_new_tokens=10, batch_size=2)
    rows = [(f"img{i}", visual[i].half()) for i in range(5)]
    by2 = caption_features(model, tok, iter(rows), config, total=5)
    by5 = caption_features(model, tok, rows, dataclasses.replace(config, batch_size=5))
    assert list(by2) == [f"img{i}" for i in range(5)] and by2 == by5
    expected = [caption_text(tok, h.tokens)
                for h in generate(model, visual.half().float(), config, tok.eot_id)]
    assert list(by2.values()) == expected
    assert len(set(by2.values())) > 1
    with pytest.raises(ValueError, match="img1.*twice"):
        caption_features(model, tok, rows[:2] + rows[1:2], config)


def test_bad_config():
    with pytest.raises(ValueError, match="method"):
        DecodeConfig(method="topk")
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(top_p=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        DecodeConfig(max_new_tokens=5, min_new_tokens=6)
    with pytest.raises(ValueError, match="batch_size"):
        DecodeConfig(batch_size=0)
    assert from_section(DecodeConfig, {"method": "beam", "beam_size": 3}, "d").beam_size == 3
    with pytest.raises(ValueError, match=r"params.yaml: decode: unknown .*'beam_width'"):
        from_section(DecodeConfig, {"beam_width": 3}, "params.yaml: decode")


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_repetition_control(method):
    """no_repeat_ngram_size leaves no repeated n-gram; a repetition penalty changes the captions;
    the cached and the naive steppers still give identical ids."""
    model, visual = tiny_model("gated_cross", "lora", seed=3), images(6, seed=2)
    with torch.no_grad():   # a decoder that loves one token: captions that loop
        model.decoder.wte.weight[5] *= 4
    base = DecodeConfig(method=method, beam_size=3, max_new_tokens=16, min_new_tokens=16)
    plain = [h.tokens for h in generate(model, visual, base, EOT_ID)]
    assert any(len(set(zip(t, t[1:]))) < len(t) - 1 for t in plain)   # repeated bigrams
    for control in (dict(no_repeat_ngram_size=2), dict(repetition_penalty=1.5),
                    dict(no_repeat_ngram_size=3, repetition_penalty=1.2)):
        config = dataclasses.replace(base, **control)
        cached = [h.tokens for h in generate(model, visual, config, EOT_ID)]
        naive = [h.tokens for h in generate(model, visual, config, EOT_ID, cached=False)]
        assert cached == naive and cached != plain, control
        n = control.get("no_repeat_ngram_size")
        if n:
            for t in cached:
                grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
                assert len(grams) == len(set(grams)), t
