"""The real GPT-2 tokenizer path, on the shared copy of GPT-2's encoder.json / vocab.bpe."""
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel

from captioning.tokenizer import IGNORE_INDEX, Tokenizer, caption_batch, target_count

GPT2_DIR = Path(__file__).parents[2] / "shared" / "gpt2"
needs_gpt2 = pytest.mark.skipif(not GPT2_DIR.is_dir(), reason=f"{GPT2_DIR} absent")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_files(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")


@needs_gpt2
def test_known_gpt2_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256
    assert tok.vocab_size == 50257
    # no prefix space, no lower-casing: "Hello" and " Hello" and "hello" differ
    assert tok.encode(" Hello") == [18435]
    assert tok.encode("hello") != tok.encode("Hello")


@needs_gpt2
def test_literal_end_token_in_user_text_is_ordinary_bytes(tok):
    ids = tok.encode("<|endoftext|>")
    assert 50256 not in ids
    assert ids == [27, 91, 437, 1659, 5239, 91, 29]  # tiktoken's encode_ordinary ids
    ids = tok.encode("a cat<|endoftext|>sits")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == "a cat<|endoftext|>sits"
    assert all(tok.eot_id not in b for b in tok.encode_batch(["x <|endoftext|>", "<|endoftext|>"]))


@needs_gpt2
@pytest.mark.parametrize("text", [
    "A man riding a wave on top of a surfboard.",
    "héllo wörld — naïve café, 東京, emoji 😀🚲!",
    "  two  spaces\nand a newline\t tab",
    "",
])
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@needs_gpt2
def test_decode_drops_end_token_and_batch_matches_single(tok):
    ids = tok.encode("Hello world")
    assert tok.decode([tok.eot_id] + ids + [tok.eot_id, tok.eot_id]) == "Hello world"
    texts = ["Hello world", "a red square", "<|endoftext|>"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([50257])


def test_the_byte_alphabet_is_the_byte_level_bpes():
    from captioning.tokenizer import BYTE_OF
    assert sorted(BYTE_OF) == sorted(ByteLevel.alphabet()) and sorted(BYTE_OF.values()) == list(range(256))


@needs_gpt2
def test_plain_python_decode_equals_the_tokenizers_librarys(tok):
    """Decoding (what the hand-in runs, without `tokenizers`) gives the library's text for any ids,
    broken UTF-8 included: random ids, and runs of single-byte tokens."""
    rng = random.Random(0)
    single_bytes = [i for s, i in json.loads((GPT2_DIR / "encoder.json").read_text()).items()
                    if len(s) == 1]
    bpe = tok._encoder_bpe()
    for n in range(3000):
        pool = range(tok.vocab_size) if n % 2 else single_bytes
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 12))] + [tok.eot_id] * (n % 3 == 0)
        assert tok.decode(ids) == bpe.decode(ids, skip_special_tokens=True), ids


@needs_gpt2
def test_identity_is_sha256_of_the_files(tok):
    again = Tokenizer.from_files(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe"))
    assert len(tok.identity) == 64 and tok.identity == again.identity


def test_caption_batch_layout():
    eot = 50256
    inp, tgt, mask = caption_batch([[5, 6, 7], [9]], eot_id=eot, max_len=10)
    assert inp.tolist() == [[eot, 5, 6, 7, eot], [eot, 9, eot, eot, eot]]
    assert tgt.tolist() == [[5, 6, 7, eot, -100], [9, eot, -100, -100, -100]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert inp.dtype == tgt.dtype == mask.dtype == torch.long
    assert IGNORE_INDEX == -100
    assert (inp != 0).all()  # padding never uses id 0 ("!" in GPT-2)
    # wherever a target counts, it is the next input token: the shift is built in, not left to the loss
    n = 0
    for row_in, row_tgt in zip(inp.tolist(), tgt.tolist()):
        for i, t in enumerate(row_tgt):
            if t != -100:
                assert row_in[i + 1] == t
                n += 1
    assert n == int((tgt != -100).sum()) == 6 == target_count([[5, 6, 7], [9]], max_len=10)


def test_caption_batch_truncates_to_max_len_and_keeps_the_end_target():
    inp, tgt, mask = caption_batch([list(range(1, 21)), [3]], eot_id=99, max_len=6)
    assert target_count([list(range(1, 21)), [3]], max_len=6) == int((tgt != IGNORE_INDEX).sum())
    assert inp.shape == (2, 6)
    assert inp[0].tolist() == [99, 1, 2, 3, 4, 99]
    assert tgt[0].tolist() == [1, 2, 3, 4, 99, -100]
    assert inp[1].tolist() == [99, 3, 99, 99, 99, 99]
    assert tgt[1].tolist() == [3, 99, -100, -100, -100, -100]
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    # an empty caption still teaches "stop at once"
    inp, tgt, _ = caption_batch([[]], eot_id=99, max_len=6)
    assert inp.tolist() == [[99, 99]] and tgt.tolist() == [[99, -100]]
    with pytest.raises(ValueError, match="max_len"):
        caption_batch([[1]], eot_id=99, max_len=1)


def test_caption_batch_rows_equal_the_layout_built_caption_by_caption():
    rng = random.Random(0)
    captions = [[rng.randrange(1, 500) for _ in range(rng.randint(0, 12))] for _ in range(50)]
    eot, max_len = 999, 10
    inp, tgt, mask = caption_batch(captions, eot_id=eot, max_len=max_len)
    width = min(max(map(len, captions)), max_len - 2) + 2
    assert inp.shape == tgt.shape == mask.shape == (50, width)
    for row, caption in enumerate(captions):
        kept = caption[:max_len - 2]
        pad = width - len(kept) - 2
        assert inp[row].tolist() == [eot] + kept + [eot] * (pad + 1)
        assert tgt[row].tolist() == kept + [eot] + [IGNORE_INDEX] * (pad + 1)
        assert mask[row].tolist() == [1] * (len(kept) + 2) + [0] * pad


@pytest.mark.parametrize("max_len, multiple, width",
                         [(48, 16, 16), (48, 5, 10), (9, 16, 9), (48, 1, 8)])
def test_caption_batch_width_multiple_only_adds_padding_columns(max_len, multiple, width):
    """Training with CUDA graphs rounds widths up (6-token captions: 8 columns), never past
    max_len."""
    captions = [[5, 6, 7, 8, 9, 10], [3]]
    plain = caption_batch(captions, eot_id=99, max_len=max_len)
    rounded = caption_batch(captions, eot_id=99, max_len=max_len, width_multiple=multiple)
    assert rounded[0].shape == (2, width)
    extra = width - plain[0].shape[1]
    for a, b, fill in zip(plain, rounded, (99, IGNORE_INDEX, 0)):
        assert torch.equal(b[:, :plain[0].shape[1]], a)
        assert b[:, plain[0].shape[1]:].tolist() == [[fill] * extra] * 2


def _write_vocab(folder, encoder, merges_text):
    (folder / "encoder.json").write_text(json.dumps(encoder))
    (folder / "vocab.bpe").write_text(merges_text)
    return folder / "encoder.json", folder / "vocab.bpe"


def test_clear_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        Tokenizer.from_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    # a byte-level vocabulary spells all 256 bytes; "a" and "b" keep ids 0 and 1
    alphabet = ["a", "b"] + sorted(set(ByteLevel.alphabet()) - {"a", "b"})
    byte_chars = {c: i for i, c in enumerate(alphabet)}
    byte_chars["ab"] = len(byte_chars)
    EOT_ID = len(byte_chars)
    enc, bpe = _write_vocab(tmp_path, byte_chars, "#version: 0.2\na b\n")
    with pytest.raises(ValueError, match=r"encoder\.json.*<\|endoftext\|>"):
        Tokenizer.from_files(enc, bpe)
    enc, bpe = _write_vocab(tmp_path, {**byte_chars, "<|endoftext|>": EOT_ID}, "#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"vocab\.bpe, line 2"):
        Tokenizer.from_files(enc, bpe)
    enc, bpe = _write_vocab(tmp_path, {**byte_chars, "<|endoftext|>": EOT_ID}, "#version: 0.2\na z\n")
    with pytest.raises(ValueError, match="not in encoder.json"):
        Tokenizer.from_files(enc, bpe)
    enc, bpe = _write_vocab(tmp_path, {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}, "#version: 0.2\na b\n")
    with pytest.raises(ValueError, match=r"encoder\.json: 254 of the 256 byte symbols are missing"):
        Tokenizer.from_files(enc, bpe)
    enc, bpe = _write_vocab(tmp_path, {**byte_chars, "<|endoftext|>": EOT_ID + 5}, "#version: 0.2\na b\n")
    with pytest.raises(ValueError, match=r"encoder\.json: ids must be exactly"):
        Tokenizer.from_files(enc, bpe)
    (tmp_path / "encoder.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"encoder\.json: not a valid JSON"):
        Tokenizer.from_files(enc, bpe)
    enc, bpe = _write_vocab(tmp_path, {**byte_chars, "<|endoftext|>": EOT_ID}, "#version: 0.2\na b\n")
    small = Tokenizer.from_files(enc, bpe)
    assert small.encode("ab") == [256] and small.encode("ba") == [1, 0]
    _write_vocab(tmp_path, {**byte_chars, "<|endoftext|>": EOT_ID}, "#version: 0.2\n")
    unmerged = Tokenizer.from_files(enc, bpe)
    assert unmerged.encode("ab") == [0, 1] and unmerged.identity != small.identity


def reference_gpt2_encode(text, encoder, merges):
    """OpenAI's GPT-2 encoder.py algorithm (MIT), written out plainly: regex split, bytes to
    unicode, then repeatedly merge the lowest-ranked adjacent pair."""
    import regex

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_encoder = dict(zip(bs, map(chr, cs)))
    ranks = {m: i for i, m in enumerate(merges)}
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    for token in regex.findall(pat, text):
        word = [byte_encoder[b] for b in token.encode("utf-8")]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(encoder[w] for w in word)
    return ids


@needs_gpt2
def test_ids_equal_the_reference_gpt2_algorithm(tok):
    pytest.importorskip("regex")
    encoder = json.loads((GPT2_DIR / "encoder.json").read_text(encoding="utf-8"))
    lines = (GPT2_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    merges = [tuple(line.split(" ")) for line in lines]
    texts = [
        "A group of people standing around a kitchen counter.",
        "Two giraffes; one's eating leaves, the other isn't!  They'll be fine...",
        "   leading spaces, trailing spaces   ",
        "Numbers 12345 and 3.14159, e-mail: someone@example.com #hashtag",
        "Ünïcödé, 日本語のテキスト, emoji 🦒🍕 and\ttabs\nnewlines\r\n",
        "a dog<|endoftext|>a cat",
    ]
    for text in texts:
        assert tok.encode(text) == reference_gpt2_encode(text, encoder, merges), text
