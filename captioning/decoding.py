"""Caption decoding: greedy, beam search, top-k / nucleus sampling, with a key/value cache.

One search loop per kind of search (`_sample_search` for greedy and sampling, `_beam_search`),
both driving a *stepper* that turns the newest token of every row into next-token logits:

- `CachedStepper`: the decoder's per-layer cache (`model.new_cache`): each step runs only the
  new token; the image's cross-attention keys/values and every prefix (visual prefix, soft
  prompt, prefix-tuning keys) are computed on the first step only. All images of a batch (and
  all beams of each image) step together.
- `NaiveStepper`: the reference, as students write it: every step re-runs the whole sequence
  through the same model forward with a fresh cache, one image at a time.

Both go through `model(ctx, ids, cache=..., capture=..., logits_from=...)`, so the two differ
only in what is recomputed, never in the math; the tests hold them to identical token ids.

Decoding starts from `<|endoftext|>` (the course's start token) and stops at it. A hypothesis'
`tokens` are the generated ids, ending with the end token when the model emitted it; its
`logprob` is the sum of the model's log-probabilities of those tokens (untempered, unfiltered;
the end token counts as a token; during the first `min_new_tokens` steps the end token is masked
before normalising, so those steps' log-probabilities are over the other tokens). Beam search
ranks by `logprob / len(tokens) ** length_penalty`.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from captioning.captioner import ImageContext

METHODS = ("greedy", "beam", "sample")
CLIP_CONTEXT = 77  # CLIP's text context, start and end tokens included


@dataclass
class DecodeConfig:
    method: str = "greedy"
    beam_size: int = 5
    length_penalty: float = 1.0  # beam ranking: logprob / n_tokens ** length_penalty
    max_new_tokens: int = 40
    min_new_tokens: int = 0  # the end token is forbidden before this many tokens (benchmarks)
    top_k: int = 0  # sampling: keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # sampling: smallest set of tokens whose probability reaches top_p
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 32  # images decoded together (times beam_size rows for beam search)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"decode.method={self.method!r}: expected one of {METHODS}")
        if self.beam_size < 1:
            raise ValueError(f"decode.beam_size must be >= 1, got {self.beam_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"decode.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"decode.min_new_tokens must be in [0, max_new_tokens], "
                             f"got {self.min_new_tokens}")
        if self.top_k < 0:
            raise ValueError(f"decode.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"decode.top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0:
            raise ValueError(f"decode.temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"decode.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Hypothesis:
    tokens: list  # generated ids; ends with the end token if the model emitted it
    logprob: float  # sum of the model's log-probabilities of `tokens`
    attention: Optional[torch.Tensor] = None  # [len(tokens), n_layers_with_it, n_head, V]
    ended: bool = False  # the model emitted the end token (else max_new_tokens cut it)

    def score(self, length_penalty):
        return self.logprob / max(len(self.tokens), 1) ** length_penalty


# --- steppers: newest token of every row -> logits of the next ---------------------------------

def _image_attention(model, attentions):
    """Attention of each row's last query over the image tokens: [R, n_layers_with_it, nh, V].

    Cross bridges: the cross-attention weights of the blocks that have one. Visual-prefix bridge:
    the self-attention weights on the prefix positions (they need not sum to 1 over the image).
    """
    span = model.visual_key_span()
    if span is not None:
        start, end = span
        rows = [self_att[:, :, -1, start:end] for self_att, _ in attentions]
    else:
        rows = [cross[:, :, -1] for _, cross in attentions if cross is not None]
    return torch.stack(rows, dim=1)


def _last_position(model, out, capture):
    """Logits [R, vocab] of each row's last position and, with capture, its image attention."""
    if capture:
        logits, attentions = out
        return logits[:, -1], _image_attention(model, attentions)
    return out[:, -1], None


class CachedStepper:
    """Incremental decoding: one new token per row and step against the per-layer cache."""

    def __init__(self, model, ctx, capture=False):
        self.model, self.ctx, self.capture = model, ctx, capture
        self.cache = model.new_cache(ctx.n_sequences)
        self.image_of_row = torch.arange(ctx.n_sequences)

    def __call__(self, new_ids):
        out = self.model(self.ctx, new_ids, cache=self.cache, capture=self.capture,
                         logits_from=new_ids.size(1) - 1)
        # After the first step the image lives in the cache (cross-attention keys/values,
        # prefix positions): the context is not read again, so it need not follow reorders.
        self.ctx = ImageContext(None, None)
        return _last_position(self.model, out, self.capture)

    def select(self, index):
        """Keep rows `index` (beam reordering, finished rows dropped)."""
        image_of_row = self.image_of_row[index.cpu()]
        same_images = torch.equal(image_of_row, self.image_of_row)
        if same_images and torch.equal(index.cpu(), torch.arange(len(index))):
            return
        for layer in self.cache.layers:
            layer.k, layer.v = layer.k.index_select(0, index), layer.v.index_select(0, index)
            # The image's keys/values (the largest tensors) are the same for every beam of an
            # image: move them only when the set of images changes.
            if layer.cross_k is not None and not same_images:
                layer.cross_k = layer.cross_k.index_select(0, index)
                layer.cross_v = layer.cross_v.index_select(0, index)
        self.image_of_row = image_of_row


class NaiveStepper:
    """The reference: the whole sequence through the model with a fresh cache at every step."""

    def __init__(self, model, ctx, capture=False):
        self.model, self.ctx, self.capture = model, ctx, capture
        self.ids = None

    def __call__(self, new_ids):
        self.ids = new_ids if self.ids is None else torch.cat([self.ids, new_ids], dim=1)
        T = self.ids.size(1)
        out = self.model(self.ctx, self.ids, cache=None, capture=self.capture, logits_from=T - 1)
        return _last_position(self.model, out, self.capture)

    def select(self, index):
        self.ids = self.ids.index_select(0, index)
        self.ctx = self.ctx.select(index)


# --- searches ---------------------------------------------------------------------------------

def filter_logits(logits, top_k=0, top_p=1.0):
    """Set to -inf every logit outside the top k and outside the nucleus of mass top_p."""
    if top_k and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _log_probs(logits, step, config, eot_id):
    logits = logits.float()
    if step < config.min_new_tokens:
        logits = logits.clone()
        logits[:, eot_id] = float("-inf")
    return logits, F.log_softmax(logits, dim=-1)


def _stack_attention(rows):
    return torch.stack(rows) if rows else None


def _sample_search(stepper, n_rows, config, eot_id, device, generator):
    """Greedy (argmax) or sampling, every row independent; finished rows leave the batch."""
    tokens = [[] for _ in range(n_rows)]
    logprob = [0.0] * n_rows
    attention = [[] for _ in range(n_rows)]
    ended = [False] * n_rows
    active = list(range(n_rows))  # original row of each row still in the batch
    ids = torch.full((n_rows, 1), eot_id, dtype=torch.long, device=device)
    for step in range(config.max_new_tokens):
        logits, att = stepper(ids)
        logits, logp = _log_probs(logits, step, config, eot_id)
        if config.method == "greedy":
            nxt = logits.argmax(dim=-1)
        else:
            filtered = filter_logits(logits / config.temperature, config.top_k, config.top_p)
            nxt = torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator)[:, 0]
        chosen_lp = logp.gather(1, nxt[:, None])[:, 0].tolist()
        keep = []
        for i, (row, tok) in enumerate(zip(active, nxt.tolist())):
            tokens[row].append(tok)
            logprob[row] += chosen_lp[i]
            if att is not None:
                attention[row].append(att[i])
            if tok == eot_id:
                ended[row] = True
            else:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            stepper.select(index)
            nxt = nxt.index_select(0, index)
            active = [active[i] for i in keep]
        ids = nxt[:, None]
    return [Hypothesis(tokens[r], logprob[r], _stack_attention(attention[r]), ended[r])
            for r in range(n_rows)]


def _beam_search(stepper, n_images, config, eot_id, device):
    """Beam search over images x beams in one batch (fairseq-style bookkeeping).

    Each step takes the 2K best (beam, token) candidates per image: an end token among the K
    best closes a hypothesis, the K best others continue. An image is done when K hypotheses are
    closed; at max_new_tokens the open beams are closed as they are. The first step runs one row
    per image (all beams would be equal) and then branches into K beams.
    """
    K = config.beam_size
    finished = [[] for _ in range(n_images)]
    # per row: (tokens, logprob, attention rows); the first step has one row per image
    beams = [([], 0.0, []) for _ in range(n_images)]
    active = list(range(n_images))  # original image of each image block still in the batch
    width = 1  # rows per active image
    ids = torch.full((n_images, 1), eot_id, dtype=torch.long, device=device)
    for step in range(config.max_new_tokens):
        logits, att = stepper(ids)
        _, logp = _log_probs(logits, step, config, eot_id)
        V = logp.size(-1)
        scores = torch.tensor([b[1] for b in beams], dtype=logp.dtype, device=device)
        cand = (scores[:, None] + logp).view(len(active), width * V)
        n_cand = min(2 * K, width * V)
        top_scores, top_idx = cand.topk(n_cand, dim=-1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        last = step == config.max_new_tokens - 1
        new_beams, parents, next_tokens, still_active = [], [], [], []
        for a, image in enumerate(active):
            chosen = []
            for rank, (s, flat) in enumerate(zip(top_scores[a], top_idx[a])):
                if s == float("-inf"):
                    break
                row, tok = a * width + flat // V, flat % V
                toks, _, atts = beams[row]
                new = (toks + [tok], s, atts + [att[row]] if att is not None else atts)
                if tok == eot_id:
                    if rank < K:
                        finished[image].append(Hypothesis(new[0], s, _stack_attention(new[2]), True))
                    continue
                chosen.append((row, tok, new))
                if len(chosen) == K:
                    break
            if len(finished[image]) >= K or last or not chosen:
                if last:
                    finished[image] += [Hypothesis(n[0], n[1], _stack_attention(n[2]), False)
                                        for _, _, n in chosen]
                continue
            still_active.append(image)
            for row, tok, new in chosen:
                parents.append(row)
                next_tokens.append(tok)
                new_beams.append(new)
        if not still_active:
            break
        index = torch.tensor(parents, device=device)
        stepper.select(index)
        beams, active, width = new_beams, still_active, K
        ids = torch.tensor(next_tokens, dtype=torch.long, device=device)[:, None]
    return [max(f, key=lambda h: h.score(config.length_penalty)) for f in finished]


@torch.inference_mode()
def generate(model, visual_tokens, config, eot_id, capture=False, cached=True, generator=None):
    """The best hypothesis for each image of `visual_tokens` [B, V, D].

    cached=True: every image and beam in one batch, incremental with the cache.
    cached=False: the naive reference, one image at a time, the whole sequence every step.
    capture: also return, per hypothesis, the attention over the image tokens of every generated
    token (the query that produced it), per layer (that has it) and head.
    generator: a torch.Generator for sampling on visual_tokens' device (default: seeded from
    config.seed).
    """
    if config.method == "sample" and generator is None:
        generator = torch.Generator(device=visual_tokens.device).manual_seed(config.seed)
    if not cached:
        return [h for i in range(visual_tokens.size(0))
                for h in _decode(NaiveStepper, model, visual_tokens[i:i + 1], config, eot_id,
                                 capture, generator)]
    return _decode(CachedStepper, model, visual_tokens, config, eot_id, capture, generator)


def _decode(stepper_cls, model, visual_tokens, config, eot_id, capture, generator):
    device = visual_tokens.device
    # the start token and every new token but the last are fed back: at most block_size new ones
    room = model.decoder.config.block_size
    if config.max_new_tokens > room:
        config = dataclasses.replace(config, max_new_tokens=room,
                                     min_new_tokens=min(config.min_new_tokens, room))
    vocab = model.decoder.config.vocab_size
    if config.method == "beam" and config.beam_size >= vocab:  # each beam needs a non-end token
        raise ValueError(f"decode.beam_size={config.beam_size} needs a vocabulary of more than "
                         f"{config.beam_size} tokens; the decoder has {vocab}")
    stepper = stepper_cls(model, model.context(visual_tokens), capture)
    if config.method == "beam":
        return _beam_search(stepper, visual_tokens.size(0), config, eot_id, device)
    return _sample_search(stepper, visual_tokens.size(0), config, eot_id, device, generator)


# --- text out ---------------------------------------------------------------------------------

_clip_tokenizer = None


def clip_token_count(text):
    """Tokens CLIP's `clip.tokenize` would use for `text`, start and end tokens included."""
    global _clip_tokenizer
    if _clip_tokenizer is None:
        from clip.simple_tokenizer import SimpleTokenizer
        _clip_tokenizer = SimpleTokenizer()
    return len(_clip_tokenizer.encode(text)) + 2


def cap_for_clip(text, context_length=CLIP_CONTEXT):
    """`text` cut by whole words (characters, for one overlong word) to fit CLIP's context."""
    if clip_token_count(text) <= context_length:
        return text
    words = text.split()
    lo, hi = 0, len(words)  # the longest word prefix that fits: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if clip_token_count(" ".join(words[:mid])) <= context_length:
            lo = mid
        else:
            hi = mid - 1
    if lo > 0:
        return " ".join(words[:lo])
    word = words[0]
    lo, hi = 0, len(word)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if clip_token_count(word[:mid]) <= context_length:
            lo = mid
        else:
            hi = mid - 1
    return word[:lo]


def caption_text(tokenizer, tokens):
    """A hypothesis' tokens as a caption: decoded (end tokens dropped), CLIP-safe, every run of
    whitespace one space (a generated line break, U+2028 or U+0085 would split the caption into
    two lines for the course's PTBTokenizer)."""
    return cap_for_clip(" ".join(tokenizer.decode(tokens).split()))


def caption_features(model, tokenizer, rows, config, device="cpu", total=None):
    """Captions for many images: `rows` yields (name, image tokens [V, D]); returns {name: caption}.

    Images are decoded `config.batch_size` at a time (times the beam size for beam search).
    """
    model.eval()
    generator = None
    if config.method == "sample":
        generator = torch.Generator(device=device).manual_seed(config.seed)
    captions = {}

    def flush(names, tensors):
        visual = torch.stack(tensors).to(device)
        for name, hyp in zip(names, generate(model, visual, config, tokenizer.eot_id,
                                             generator=generator)):
            captions[name] = caption_text(tokenizer, hyp.tokens)

    names, tensors = [], []
    for name, tokens in tqdm(rows, total=total, desc=f"decode ({config.method})", unit="img"):
        if name in captions or name in names:
            raise ValueError(f"image {name!r} appears twice in the features")
        names.append(name)
        tensors.append(torch.as_tensor(tokens))
        if len(names) == config.batch_size:
            flush(names, tensors)
            names, tensors = [], []
    if names:
        flush(names, tensors)
    return captions
