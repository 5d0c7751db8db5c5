"""GPT-2 byte-level BPE tokenizer read from `encoder.json` + `vocab.bpe`, and the caption batch layout.

Works for any vocabulary in GPT-2's file format (the real 50257-token one, or the small demo one),
as long as it holds `<|endoftext|>`, which is both the start and the end token.

User text never yields the end token: the literal string "<|endoftext|>" inside a caption is
encoded as ordinary bytes ("<", "|", "end", "of", "text", "|", ">"), exactly like tiktoken's
`encode_ordinary`, so a caption cannot end itself early or smuggle in a start token.

Encoding runs the `tokenizers` library (training); decoding needs only the vocabulary and is
plain Python, so the hand-in decodes where `tokenizers` is not installed (the course's grading
environment).
"""
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import torch

EOT = "<|endoftext|>"
IGNORE_INDEX = -100  # targets at this value do not count in the loss (torch's cross_entropy default)


def bytes_to_unicode():
    """GPT-2's map from each byte to the printable character that stands for it in the
    vocabulary (openai/gpt-2 encoder.py; tokenizers' ByteLevel alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_encoder(path):
    """encoder.json: {token: id} with ids exactly 0..V-1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: encoder.json not found")
    try:
        encoder = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None
    if not isinstance(encoder, dict) or not encoder:
        raise ValueError(f"{path}: expected a non-empty JSON object mapping token -> id")
    bad = [k for k, v in encoder.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{path}: ids must be integers; e.g. token {bad[0]!r} -> {encoder[bad[0]]!r}")
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise ValueError(f"{path}: ids must be exactly 0..{len(encoder) - 1}, each once")
    if EOT not in encoder:
        raise ValueError(f"{path}: the vocabulary has no {EOT} token (needed as start/end token)")
    # Byte-level BPE must be able to spell every byte; a missing one would silently drop text.
    missing = sorted(set(BYTE_OF) - set(encoder))
    if missing:
        raise ValueError(f"{path}: {len(missing)} of the 256 byte symbols are missing "
                         f"(e.g. {missing[0]!r}); not a byte-level BPE vocabulary")
    return encoder


def _read_merges(path, encoder):
    """vocab.bpe: optional '#version' header, then one merge 'a b' per line, in priority order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: vocab.bpe not found")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    merges = []
    for lineno, line in enumerate(lines, 1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{path}, line {lineno}: expected two tokens separated by one space, got {line!r}")
        a, b = parts
        for tok in (a, b, a + b):
            if tok not in encoder:
                raise ValueError(f"{path}, line {lineno}: merge {line!r} uses {tok!r}, "
                                 "which is not in encoder.json (the two files do not belong together)")
        merges.append((a, b))
    return merges


class Tokenizer:
    def __init__(self, encoder, merges, identity=""):
        """Prefer `Tokenizer.from_files`; this takes an already validated vocabulary and merge list."""
        self._encoder, self._merges = encoder, merges
        self._token_of = {i: token for token, i in encoder.items()}
        self._bpe = None   # the `tokenizers` BPE, built at the first encode
        self.eot_id = encoder[EOT]
        self.vocab_size = len(encoder)
        self.identity = identity

    @classmethod
    def from_files(cls, encoder_json, vocab_bpe):
        encoder = _read_encoder(encoder_json)
        merges = _read_merges(vocab_bpe, encoder)
        identity = hashlib.sha256(
            f"encoder.json:{_sha256(encoder_json)}\nvocab.bpe:{_sha256(vocab_bpe)}\n".encode()
        ).hexdigest()
        return cls(encoder, merges, identity=identity)

    def _encoder_bpe(self):
        if self._bpe is None:
            from tokenizers import ByteLevelBPETokenizer
            bpe = ByteLevelBPETokenizer(vocab=self._encoder, merges=self._merges,
                                        add_prefix_space=False, lowercase=False)
            # Without this the end token would be split into bytes...
            bpe.add_special_tokens([EOT])
            # ...and with it, user text holding the literal string would become the id: forbid that.
            bpe._tokenizer.encode_special_tokens = True
            if bpe.get_vocab_size(with_added_tokens=True) != self.vocab_size:
                raise ValueError("tokenizers library disagrees on the vocabulary size "
                                 f"({bpe.get_vocab_size(with_added_tokens=True)} != {self.vocab_size})")
            self._bpe = bpe
        return self._bpe

    def encode(self, text):
        """Token ids of `text`, without start/end tokens (see the module note on "<|endoftext|>")."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._encoder_bpe().encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects str items, got {type(t).__name__}")
        return [e.ids for e in self._encoder_bpe().encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        """Text of `ids` with every end token dropped (they mark where a caption starts and stops);
        bytes that are no valid UTF-8 become U+FFFD, as in `tokenizers`.

        A generator that ran past its end token should cut there first: the text after it would
        otherwise be joined on.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (size {self.vocab_size})")
        symbols = "".join(self._token_of[i] for i in ids if i != self.eot_id)
        return bytes(BYTE_OF[c] for c in symbols).decode("utf-8", errors="replace")


def caption_batch(token_lists, eot_id, max_len, width_multiple=1):
    """Pad tokenised captions into the course's training layout.

    For a caption t1..tN:  input_ids = [eot, t1..tN, eot, eot...]   (padding uses eot, never 0:
                           targets   = [t1..tN, eot, -100, -100...]  id 0 is "!" in GPT-2)
                           attention_mask = 1 over [eot, t1..tN, eot], 0 over the padding
    so targets[i] is the token that follows input_ids[i]. The width is the longest row in the batch,
    rounded up to a multiple of `width_multiple` (but at most max_len): compiled training meets a
    few widths instead of one per caption length; the extra columns are padding.
    A caption longer than max_len - 2 tokens keeps its first max_len - 2 tokens and still ends with
    the eot target, so rows never exceed max_len and the model still learns to stop.
    Returns three LongTensors of shape [B, T] with T <= max_len.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (start and end token), got {max_len}")
    token_lists = [list(t)[: max_len - 2] for t in token_lists]
    if not token_lists:
        raise ValueError("caption_batch needs at least one caption")
    # Built with numpy in a few whole-array operations: per-row tensor writes were ~15 operator
    # calls per caption, 20% of a training step's calls at batch 64 (bench/ops.py).
    lengths = np.array([len(t) for t in token_lists])
    B, width = len(token_lists), int(lengths.max()) + 2
    width = min(max_len, -(-width // width_multiple) * width_multiple)
    is_token = np.arange(width) < lengths[:, None]   # [B, width]: targets[i, j] is a caption token
    targets = np.full((B, width), IGNORE_INDEX, dtype=np.int64)
    targets[is_token] = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64,
                                    count=int(lengths.sum()))   # row-major, as the lists run
    targets[np.arange(B), lengths] = eot_id
    input_ids = np.full((B, width), eot_id, dtype=np.int64)
    input_ids[:, 1:] = np.where(is_token[:, :-1], targets[:, :-1], eot_id)   # inputs: targets shifted
    attention_mask = (np.arange(width) < lengths[:, None] + 2).astype(np.int64)
    return torch.from_numpy(input_ids), torch.from_numpy(targets), torch.from_numpy(attention_mask)


def length_parts(token_lists, parts):
    """The indices of `token_lists` sorted by length and cut into `parts` runs of (nearly) equal
    size: sub-batches of similar length, each padded by caption_batch to its own longest caption
    instead of all to the batch's longest (train.speed.length_parts)."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    size = -(-len(order) // parts)
    return [order[start:start + size] for start in range(0, len(order), size)]


def target_count(token_lists, max_len):
    """How many targets caption_batch gives these captions: each one's kept tokens + its end token.
    The weight of a batch's mean token loss in an average over tokens."""
    return sum(min(len(t), max_len - 2) + 1 for t in token_lists)
