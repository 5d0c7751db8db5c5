"""The demo world's text side: the BPE vocabulary in GPT-2's file format and the small GPT-2 saved
in the course decoder_model.bin format, on a tiny COCO-style caption set built here."""
import itertools
import json
import math

import pytest
import torch
from common.params import from_section
from tokenizers.pre_tokenizers import ByteLevel

from demo.lm_pretrain import LMConfig, lm_loss, lr_at, pretrain, save_decoder
from demo.vocab import VocabConfig, build_demo_vocab, read_captions, train_vocab, write_vocab
from captioning.gpt2 import load_course_checkpoint
from captioning.tokenizer import EOT, Tokenizer

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]
RELATIONS = ["above", "below", "to the left of", "next to"]

TINY_LM = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, epochs=4, batch_size=16, lr=1e-2,
               warmup_steps=5, log_every=2, threads=1)


def tiny_captions(split):
    """A deterministic little caption grammar; val uses combinations train does not."""
    caps = []
    for i, (c1, s1, rel, c2, s2) in enumerate(itertools.product(COLOURS, SHAPES, RELATIONS, COLOURS, SHAPES)):
        if (i % 7 == 0) != (split == "val"):
            continue
        caps.append(f"a {c1} {s1} {rel} a {c2} {s2}" if i % 2 else f"there is a {c1} {s1} {rel} a {c2} {s2}.")
    return caps[::5]


def write_coco(path, captions):
    images = [{"file_name": f"img_{i:04d}.jpg", "id": i} for i in range(len(captions))]
    anns = [{"caption": c, "image_id": i, "id": i} for i, c in enumerate(captions)]
    path.write_text(json.dumps({"images": images, "annotations": anns}))


@pytest.fixture(scope="module")
def p2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("p2_data")
    write_coco(folder / "train.json", tiny_captions("train"))
    write_coco(folder / "val.json", tiny_captions("val"))
    build_demo_vocab(folder, VocabConfig(vocab_size=300, min_frequency=2))
    return folder


def test_vocab_files_are_in_gpt2_format(p2):
    lines = (p2 / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2"
    merges = lines[1:-1]  # OpenAI's encoder.py reads exactly this slice: the file ends with "\n"
    assert lines[-1] == "" and merges and all(len(m.split(" ")) == 2 for m in merges)
    encoder = json.loads((p2 / "encoder.json").read_text(encoding="utf-8"))
    assert sorted(encoder.values()) == list(range(len(encoder)))
    assert encoder[EOT] == len(encoder) - 1 == max(encoder.values())
    assert set(ByteLevel.alphabet()) <= set(encoder)  # every byte can be spelled
    assert all(a + b in encoder for a, b in (m.split(" ") for m in merges))
    assert len(encoder) <= 300
    assert (p2 / "encoder.json").read_text(encoding="ascii")  # ASCII-escaped, like OpenAI's file


def test_vocab_reloads_and_round_trips(p2):
    tok = Tokenizer.from_files(p2 / "encoder.json", p2 / "vocab.bpe")
    assert tok.eot_id == tok.vocab_size - 1
    for caption in read_captions(p2 / "train.json")[:50] + read_captions(p2 / "val.json")[:50]:
        ids = tok.encode(caption)
        assert tok.eot_id not in ids
        assert tok.decode(ids) == caption
    # the merges were learnt: frequent words are single tokens, not bytes
    assert len(tok.encode(" triangle")) == 1 and len(tok.encode("a red circle")) == 3
    # text outside the training captions still encodes losslessly (byte fallback), unicode too
    assert tok.decode(tok.encode("Zebra über 東京 <|endoftext|>")) == "Zebra über 東京 <|endoftext|>"
    assert tok.eot_id not in tok.encode("<|endoftext|>")


def test_vocab_is_deterministic(p2, tmp_path):
    encoder, merges = train_vocab(read_captions(p2 / "train.json"), 300, 2)
    write_vocab(encoder, merges, tmp_path)
    for name in ("encoder.json", "vocab.bpe"):
        assert (tmp_path / name).read_bytes() == (p2 / name).read_bytes()


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.json"):
        read_captions(tmp_path / "train.json")
    (tmp_path / "bad.json").write_text(json.dumps({"images": [], "annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match=r"bad\.json: annotations\[0\] has no string 'caption'"):
        read_captions(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_vocab(["a b c"], 100)
    with pytest.raises(ValueError, match="demo_gpt2: unknown parameter"):
        from_section(LMConfig, {"n_layers": 2}, "demo_gpt2")
    with pytest.raises(ValueError, match="demo_vocab: unknown parameter"):
        from_section(VocabConfig, {"size": 2}, "demo_vocab")


def test_lr_schedule_warms_up_then_decays_by_cosine():
    cfg = LMConfig(lr=1e-3, warmup_steps=10, min_lr_frac=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55e-3)  # halfway through the cosine
    assert lr_at(100, 100, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, 100, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.fixture(scope="module")
def trained(p2):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and the machine is shared
    tok = Tokenizer.from_files(p2 / "encoder.json", p2 / "vocab.bpe")
    cfg = from_section(LMConfig, TINY_LM, "demo_gpt2")
    train, val = read_captions(p2 / "train.json"), read_captions(p2 / "val.json")
    model, metrics, train_curve, val_curve = pretrain(tok, train, val, cfg, progress=False)
    yield tok, cfg, model, metrics, train_curve, val_curve
    torch.set_num_threads(threads)


def test_training_lowers_the_loss(trained):
    tok, cfg, model, metrics, train_curve, val_curve = trained
    # a few dozen steps on held-out combinations: far better than the untrained (same seed) model
    assert metrics["val_perplexity_untrained"] > 0.5 * tok.vocab_size
    assert metrics["val_perplexity"] < 0.25 * metrics["val_perplexity_untrained"]
    assert train_curve[-1]["loss"] < 0.5 * train_curve[0]["loss"]
    assert [r["epoch"] for r in val_curve] == list(range(cfg.epochs + 1))
    assert val_curve[-1]["val_loss"] < val_curve[1]["val_loss"] < val_curve[0]["val_loss"]
    assert metrics["val_perplexity_untrained"] == pytest.approx(math.exp(val_curve[0]["val_loss"]), rel=1e-4)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(val_curve[-1]["val_loss"]), rel=1e-4)
    assert metrics["steps"] == train_curve[-1]["step"] == cfg.epochs * math.ceil(metrics["train_captions"] / cfg.batch_size)


def test_length_parts_give_the_whole_batch_loss_and_gradients(trained, p2):
    """demo_gpt2.length_parts: sub-batches of similar length, each padded to its own longest
    caption: the whole batch's mean token loss and gradients, up to fp32 rounding."""
    tok, cfg, model, _, _, _ = trained
    batch = tok.encode_batch(read_captions(p2 / "train.json")[:24])
    assert len({len(t) for t in batch}) > 2
    results = []
    for parts in (1, 3):
        model.zero_grad(set_to_none=True)
        loss, count = lm_loss(model, batch, tok.eot_id, cfg.block_size, parts)
        loss.backward()
        results.append((loss, count, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, whole_count, whole_grads), (split, split_count, split_grads) = results
    assert split_count == whole_count
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max())


def test_pretraining_is_deterministic(trained, p2):
    tok, cfg, model, metrics, _, _ = trained
    again, metrics2, _, _ = pretrain(tok, read_captions(p2 / "train.json"), read_captions(p2 / "val.json"),
                                     cfg, progress=False)
    assert metrics2["val_perplexity"] == metrics["val_perplexity"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_decoder_file_bytes_do_not_depend_on_the_path(trained, tmp_path):
    tok, _, model, _, _, _ = trained
    ids = torch.tensor([[tok.eot_id] + tok.encode("a red circle")])
    save_decoder(model, tmp_path / "decoder_model.bin", ids)
    save_decoder(model, tmp_path / "other.bin", ids)
    assert (tmp_path / "decoder_model.bin").read_bytes() == (tmp_path / "other.bin").read_bytes()


def test_decoder_file_has_the_course_keys_and_conv1d_shapes(trained, tmp_path):
    tok, cfg, model, _, _, _ = trained
    path = tmp_path / "decoder_model.bin"
    save_decoder(model, path, torch.tensor([[tok.eot_id] + tok.encode("a red circle above a blue star")]))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    C, V, L = cfg.n_embd, tok.vocab_size, cfg.n_layer
    expected = {"wte.weight": (V, C), "wpe.weight": (cfg.block_size, C),
                "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(L):
        expected.update({
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
            f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, 4 * C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
            f"h.{i}.mlp.c_proj.weight": (4 * C, C), f"h.{i}.mlp.c_proj.bias": (C,),
        })
    assert set(sd) == set(expected)  # no lm_head (tied to wte), no transformer. prefix
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(v.dtype == torch.float32 for v in sd.values())
    # Conv1D orientation, visible even where the matrix is square: y = x @ W + b
    x = torch.randn(3, C)
    block = model.h[0].attn
    assert torch.allclose(x @ sd["h.0.attn.c_proj.weight"] + sd["h.0.attn.c_proj.bias"], block.c_proj(x), atol=1e-6)
    # and the one loader reads it back to the same model
    reloaded = load_course_checkpoint(path, n_head=cfg.n_head)
    ids = torch.tensor([[tok.eot_id] + tok.encode("a green square below a red star")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))


def test_stages_run_end_to_end(p2, tmp_path):
    from stages import demo_gpt2, demo_vocab

    folder = tmp_path / "p2_data"
    folder.mkdir()
    for name in ("train.json", "val.json"):
        (folder / name).write_bytes((p2 / name).read_bytes())
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"demo_vocab": {"vocab_size": 300},
                                  "demo_gpt2": {**TINY_LM, "epochs": 1}}))  # JSON is YAML
    demo_vocab.main(["--p2-data", str(folder), "--metrics", str(tmp_path / "m" / "demo_vocab.json"),
                     "--params", str(params)])
    threads = torch.get_num_threads()
    try:
        demo_gpt2.main(["--p2-data", str(folder), "--metrics", str(tmp_path / "m" / "demo_gpt2.json"),
                        "--plots", str(tmp_path / "plots"), "--params", str(params),
                        "--log", str(tmp_path / "log.json")])   # not the repository's logs/
    finally:
        torch.set_num_threads(threads)  # the stage sets its own thread count for its process
    metrics = json.loads((tmp_path / "m" / "demo_gpt2.json").read_text())
    assert metrics["val_perplexity"] < metrics["val_perplexity_untrained"]
    assert json.loads((tmp_path / "m" / "demo_vocab.json").read_text())["vocab_size"] <= 300
    assert load_course_checkpoint(folder / "decoder_model.bin", n_head=2).config.n_layer == 2
    assert (tmp_path / "plots" / "train_loss.csv").read_text().startswith("step,epoch,loss,lr")
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000
    assert not list(folder.glob(".tmp-*"))

    # the text files may also live outside p2_data (a DVC output must not sit inside another's)
    text = tmp_path / "text"
    demo_vocab.main(["--p2-data", str(folder), "--out-dir", str(text), "--metrics", str(tmp_path / "m2.json"),
                     "--params", str(params)])
    assert (text / "encoder.json").read_bytes() == (folder / "encoder.json").read_bytes()
