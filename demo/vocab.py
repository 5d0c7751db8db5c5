"""The demo world's vocabulary: a byte-level BPE trained on the demo training captions, written as
GPT-2's `encoder.json` + `vocab.bpe` so that the same `captioning.tokenizer.Tokenizer` reads it.

GPT-2's file format, exactly: encoder.json is a JSON object token -> id (ASCII-escaped, like
OpenAI's file); vocab.bpe is the line `#version: 0.2`, then one merge `a b` per line in priority
order, with a final newline (OpenAI's encoder.py drops the last line of the split). `<|endoftext|>`
takes the last id. All 256 byte symbols are in the vocabulary, so any text can be encoded.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer

from common.atomic import atomic_open
from captioning.tokenizer import EOT, Tokenizer


@dataclass
class VocabConfig:
    vocab_size: int = 1000     # upper bound incl. the 256 bytes and <|endoftext|>; may come out smaller
    min_frequency: int = 2     # a pair must occur this often to be merged


def read_captions(path):
    """Captions of a COCO-style `{"images": [...], "annotations": [{"caption", "image_id", "id"}]}`
    file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: caption file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list) or not anns:
        raise ValueError(f"{path}: expected a non-empty 'annotations' list (COCO caption format)")
    captions = []
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str):
            raise ValueError(f"{path}: annotations[{i}] has no string 'caption'")
        captions.append(a["caption"])
    return captions


def train_vocab(captions, vocab_size, min_frequency=2):
    """Train a byte-level BPE on `captions`: returns (encoder {token: id}, merges [(a, b)]).

    vocab_size bounds the whole vocabulary including the 256 byte symbols and `<|endoftext|>`;
    the trainer stops earlier when no pair occurs min_frequency times, so it may come out smaller.
    """
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level vocabulary needs at least 258 tokens "
                         "(256 bytes, one merge, <|endoftext|>)")
    if not captions:
        raise ValueError("train_vocab needs at least one caption")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, lowercase=False)
    bpe.train_from_iterator(captions, vocab_size=vocab_size - 1, min_frequency=min_frequency,
                            show_progress=False, special_tokens=[])  # the 256 byte symbols are always included
    model = json.loads(bpe._tokenizer.to_str())["model"]
    encoder = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if EOT in encoder:
        raise ValueError(f"the captions produced the token {EOT!r} by merging; refusing an ambiguous vocabulary")
    encoder[EOT] = len(encoder)
    return encoder, merges


def write_vocab(encoder, merges, folder):
    """Write encoder.json and vocab.bpe into `folder` (each atomically); returns their paths."""
    folder = Path(folder)
    enc_path, bpe_path = folder / "encoder.json", folder / "vocab.bpe"
    with atomic_open(enc_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(encoder))
    with atomic_open(bpe_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return enc_path, bpe_path


def build_demo_vocab(p2_dir, cfg, out_dir=None):
    """Train on `p2_dir/train.json`, write encoder.json + vocab.bpe into out_dir (default: beside
    it, as in the course's p2_data), reload them through the course tokenizer and return a few
    statistics (tokens per caption on train and val)."""
    p2_dir = Path(p2_dir)
    train = read_captions(p2_dir / "train.json")
    encoder, merges = train_vocab(train, cfg.vocab_size, cfg.min_frequency)
    enc_path, bpe_path = write_vocab(encoder, merges, out_dir or p2_dir)
    tok = Tokenizer.from_files(enc_path, bpe_path)
    stats = {"vocab_size": tok.vocab_size, "requested_vocab_size": cfg.vocab_size,
             "merges": len(merges), "eot_id": tok.eot_id}
    for split, captions in (("train", train), ("val", read_captions(p2_dir / "val.json"))):
        ids = tok.encode_batch(captions)
        bad = [c for c, t in zip(captions, ids) if tok.decode(t) != c]
        if bad:
            raise RuntimeError(f"{split} caption does not survive encode/decode: {bad[0]!r}")
        lens = [len(t) for t in ids]
        stats[f"{split}_tokens_per_caption_mean"] = round(sum(lens) / len(lens), 3)
        stats[f"{split}_tokens_per_caption_max"] = max(lens)
    return stats
