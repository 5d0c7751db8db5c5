"""The GPT-2 decoder against a reference forward written here from the course's file format.

The reference reads the course-format state dict directly (Conv1D orientation: y = x @ W + b,
tied lm_head), so a wrong transpose, a wrong GELU, a mis-scaled attention or a wrong mask in
captioning/gpt2.py shows up as a logits mismatch (minGPT's test pattern).
"""
import math
import os
from pathlib import Path

import pytest
import torch

from captioning import gpt2 as gpt2_module
from captioning.gpt2 import (GPT2, CheckpointError, GPT2Config, config_from_state_dict,
                         course_state_dict, load_course_checkpoint, load_course_state_dict,
                         read_state_dict)
from captioning.tokenizer import Tokenizer

GPT2_FILES = Path(__file__).resolve().parents[2] / "shared" / "gpt2"
N_LAYER, N_HEAD, N_EMBD, BLOCK = 2, 4, 64, 128


def random_course_state_dict(vocab_size, n_layer=N_LAYER, n_embd=N_EMBD, block_size=BLOCK, seed=0):
    """A course-format state dict with weights large enough that attention is far from uniform,
    plus the `attn.bias` / `attn.masked_bias` buffers that the HF-era file carries."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.2: torch.randn(*shape, generator=g) * std
    C = n_embd
    sd = {"wte.weight": r(vocab_size, C, std=0.1), "wpe.weight": r(block_size, C, std=0.5),
          "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(n_layer):
        p = f"h.{i}."
        sd.update({
            p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C),
            p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
            p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
            p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
            p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
            p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
            p + "attn.bias": torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size,
                                                                                 block_size),
            p + "attn.masked_bias": torch.tensor(-1e4),
        })
    return sd


def reference_forward(sd, ids, n_head):
    """Plain GPT-2 (Radford et al. 2019) straight from the course-format tensors."""
    def layer_norm(x, w, b, eps=1e-5):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + b

    def gelu(x):  # GPT-2's tanh approximation
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    B, T = ids.shape
    C = sd["wte.weight"].shape[1]
    hd = C // n_head
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("h.")})
    x = sd["wte.weight"][ids] + sd["wpe.weight"][:T]
    for i in range(n_layer):
        w = lambda name: sd[f"h.{i}.{name}"]
        h = layer_norm(x, w("ln_1.weight"), w("ln_1.bias"))
        qkv = h @ w("attn.c_attn.weight") + w("attn.c_attn.bias")
        q, k, v = (t.reshape(B, T, n_head, hd).permute(0, 2, 1, 3) for t in qkv.split(C, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        att = scores.masked_fill(future, float("-inf")).softmax(-1)
        y = (att @ v).permute(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ w("attn.c_proj.weight") + w("attn.c_proj.bias")
        h = layer_norm(x, w("ln_2.weight"), w("ln_2.bias"))
        h = gelu(h @ w("mlp.c_fc.weight") + w("mlp.c_fc.bias"))
        x = x + h @ w("mlp.c_proj.weight") + w("mlp.c_proj.bias")
    x = layer_norm(x, sd["ln_f.weight"], sd["ln_f.bias"])
    return x @ sd["wte.weight"].T


@pytest.fixture(scope="module")
def tokenizer():
    if not (GPT2_FILES / "encoder.json").exists():
        pytest.skip(f"GPT-2 vocabulary not found at {GPT2_FILES}")
    return Tokenizer.from_files(GPT2_FILES / "encoder.json", GPT2_FILES / "vocab.bpe")


@pytest.fixture(scope="module")
def real_vocab_sd():
    return random_course_state_dict(vocab_size=50257)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory, real_vocab_sd):
    path = tmp_path_factory.mktemp("gpt2") / "decoder_model.bin"
    torch.save(real_vocab_sd, path)
    return path


def test_logits_equal_reference_on_real_gpt2_tokens(tokenizer, real_vocab_sd, checkpoint_file):
    texts = ["A man riding a wave on top of a surfboard.", "Two dogs play in the snow near a red barn."]
    rows = [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode("Hello world") == [15496, 995]  # really GPT-2's vocabulary
    T = min(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.eot_id] + r[:T] for r in rows])
    assert ids.max() > 1000  # real BPE ids, not bytes

    model = load_course_checkpoint(checkpoint_file, n_head=N_HEAD)  # the file, buffers included
    assert model.config == GPT2Config(vocab_size=50257, block_size=BLOCK, n_layer=N_LAYER,
                                      n_head=N_HEAD, n_embd=N_EMBD)
    model.eval()
    with torch.no_grad():
        ours = model(ids)
        ours_captured, attentions = model(ids, capture=True)
        # exact arithmetic (float64) from the float32 tensors: ours may differ only by fp32 rounding
        ref = reference_forward({k: v.double() for k, v in real_vocab_sd.items()}, ids, N_HEAD).float()
    assert ours.shape == ref.shape == (2, T + 1, 50257)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_captured, ref, atol=1e-5, rtol=0)
    # the reference is sensitive: a wrong head count (a plausible bug) is far off
    assert (reference_forward(real_vocab_sd, ids, 2) - ref).abs().max() > 1e-2
    # captured self-attention rows are causal distributions
    self_att = attentions[0][0]
    assert self_att.shape == (2, N_HEAD, T + 1, T + 1)
    torch.testing.assert_close(self_att.sum(-1), torch.ones(2, N_HEAD, T + 1))
    assert self_att.triu(diagonal=1).abs().max() == 0


def test_greedy_ids_equal_reference(real_vocab_sd):
    model = GPT2(config_from_state_dict(real_vocab_sd, n_head=N_HEAD))
    load_course_state_dict(model, real_vocab_sd)
    ids = torch.tensor([[50256, 464, 3797]])
    ref_ids = ids.clone()
    with torch.no_grad():
        cache = model.new_cache(1)
        logits = model(ids, cache)
        for _ in range(6):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            logits = model(nxt, cache)
            ref_ids = torch.cat([ref_ids, reference_forward(real_vocab_sd, ref_ids, N_HEAD)[:, -1]
                                 .argmax(-1, keepdim=True)], 1)
    assert ids.tolist() == ref_ids.tolist()


def test_cached_decoding_equals_full_forward():
    torch.manual_seed(0)
    sd = random_course_state_dict(vocab_size=97, block_size=16)
    model = load_course_state_dict(GPT2(config_from_state_dict(sd, n_head=N_HEAD)), sd)
    ids = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3)
        # 4 tokens (square: SDPA's is_causal), 3 after 4 past keys (the lower-right mask),
        # then one at a time (no mask)
        parts = [model(ids[:, :4], cache), model(ids[:, 4:7], cache)]
        parts += [model(ids[:, t:t + 1], cache) for t in range(7, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    assert cache.text_len == 9
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_course_state_dict_round_trips(real_vocab_sd):
    model = load_course_state_dict(GPT2(config_from_state_dict(real_vocab_sd, n_head=N_HEAD)),
                                   real_vocab_sd)
    out = course_state_dict(model)
    expected = {k: v for k, v in real_vocab_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert out.keys() == expected.keys()
    for k in expected:
        assert out[k].shape == expected[k].shape, k
        assert torch.equal(out[k], expected[k]), k
    assert model.lm_head.weight is model.wte.weight  # tied
    # what course_state_dict writes, load_course_state_dict reads back identically
    again = course_state_dict(load_course_state_dict(GPT2(model.config), out))
    assert all(torch.equal(again[k], out[k]) for k in out)


def test_hf_prefix_and_lm_head_are_accepted():
    sd = random_course_state_dict(vocab_size=97, block_size=16)
    hf = {"transformer." + k: v for k, v in sd.items()}
    hf["lm_head.weight"] = sd["wte.weight"]
    model = load_course_state_dict(GPT2(config_from_state_dict(hf, n_head=N_HEAD)), hf)
    assert torch.equal(model.h[1].attn.c_attn.weight, sd["h.1.attn.c_attn.weight"].t())


def small_file(tmp_path, edit, name="decoder_model.bin"):
    sd = random_course_state_dict(vocab_size=97, block_size=16)
    edit(sd)
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_missing_key_is_refused_naming_file_and_key(tmp_path):
    path = small_file(tmp_path, lambda sd: sd.pop("h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError) as e:
        load_course_checkpoint(path, n_head=N_HEAD)
    assert str(path) in str(e.value) and "h.1.mlp.c_fc.bias" in str(e.value) and "missing" in str(e.value)


def test_unexpected_key_is_refused_naming_file_and_key(tmp_path):
    path = small_file(tmp_path, lambda sd: sd.update({"h.0.attn.q_norm.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError) as e:
        load_course_checkpoint(path, n_head=N_HEAD)
    assert str(path) in str(e.value) and "h.0.attn.q_norm.weight" in str(e.value)
    assert "unexpected" in str(e.value)


def test_missing_layer_is_refused(tmp_path):
    def drop_layer_0(sd):
        for k in [k for k in sd if k.startswith("h.0.")]:
            del sd[k]
    path = small_file(tmp_path, drop_layer_0)
    with pytest.raises(CheckpointError, match=r"1 blocks are missing \(e\.g\. h\.0\)"):
        load_course_checkpoint(path, n_head=N_HEAD)


def test_a_crafted_block_number_builds_nothing(tmp_path, monkeypatch):
    """h.100000.ln_1.weight beside a 2-block GPT-2 would make a 100,001-block model (~80 GB at
    the demo's size): refused from the keys, before any block is built."""
    built = []
    monkeypatch.setattr(gpt2_module.Block, "__init__", lambda *a: built.append(1) or None)
    path = small_file(tmp_path, lambda sd: sd.update({"h.100000.ln_1.weight": torch.zeros(32)}))
    with pytest.raises(CheckpointError, match=r"up to h\.100000, but 99998 blocks are missing "
                                              r"\(e\.g\. h\.2, h\.3"):
        load_course_checkpoint(path, n_head=N_HEAD)
    assert not built


@pytest.mark.parametrize("key,shape", [("h.0.attn.c_proj.weight", (64, 32)),
                                       ("h.1.ln_2.weight", (32,)),
                                       ("wpe.weight", (16, 32))])
def test_wrong_width_is_refused_naming_file_and_key(tmp_path, key, shape):
    path = small_file(tmp_path, lambda sd: sd.update({key: torch.zeros(shape)}))
    with pytest.raises(CheckpointError) as e:
        load_course_checkpoint(path, n_head=N_HEAD)
    assert str(path) in str(e.value) and key in str(e.value), str(e.value)


def test_wrong_rank_embedding_is_refused(tmp_path):
    path = small_file(tmp_path, lambda sd: sd.update({"wte.weight": torch.zeros(97 * 64)}))
    with pytest.raises(CheckpointError, match="wte.weight"):
        load_course_checkpoint(path, n_head=N_HEAD)


def test_heads_must_divide_width(tmp_path):
    path = small_file(tmp_path, lambda sd: None)
    with pytest.raises(CheckpointError, match="not divisible by n_head=5"):
        load_course_checkpoint(path, n_head=5)


def test_truncated_file_is_refused(tmp_path):
    path = small_file(tmp_path, lambda sd: None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_course_checkpoint(path, n_head=N_HEAD)
    assert str(path) in str(e.value)


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    import os
    import signal
    fifo = tmp_path / "decoder_model.bin"
    os.mkfifo(fifo)

    def blocked(*_):
        raise TimeoutError("reading the pipe blocked")
    previous = signal.signal(signal.SIGALRM, blocked)   # fail the test, never hang the suite
    signal.alarm(20)
    try:
        with pytest.raises(CheckpointError, match="not a regular file"):
            read_state_dict(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_missing_file_and_non_state_dict_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "nope.bin")
    path = tmp_path / "list.bin"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match=f"{path}: not a state dict of tensors"):
        read_state_dict(path)
    path = tmp_path / "nested.bin"
    torch.save({"state_dict": {"wte.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        read_state_dict(path)


class Payload:
    """Unpickling this calls os.mkdir(marker): observable proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_payload_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "payload_ran"
    sd = random_course_state_dict(vocab_size=97, block_size=16)
    sd["h.0.attn.masked_bias"] = Payload(marker)
    path = tmp_path / "decoder_model.bin"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_course_checkpoint(path, n_head=N_HEAD)
    assert str(path) in str(e.value)
    assert not marker.exists(), "loading ran code from the checkpoint"
    # the payload is real: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_an_untied_lm_head_is_refused(tmp_path):
    from captioning.gpt2 import GPT2, GPT2Config, CheckpointError, course_state_dict, load_course_checkpoint
    model = GPT2(GPT2Config(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=8))
    sd = course_state_dict(model)
    sd["lm_head.weight"] = sd["wte.weight"].clone()
    torch.save(sd, tmp_path / "tied.bin")
    load_course_checkpoint(tmp_path / "tied.bin", n_head=2)  # a copy of wte is the tie itself
    sd["lm_head.weight"] = sd["wte.weight"] + 1
    torch.save(sd, tmp_path / "untied.bin")
    with pytest.raises(CheckpointError, match="untied.bin.*lm_head"):
        load_course_checkpoint(tmp_path / "untied.bin", n_head=2)
