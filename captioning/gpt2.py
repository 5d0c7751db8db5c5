"""GPT-2 decoder that reads the course's `decoder_model.bin`, with the hooks captioning needs.

One forward path serves training and incremental decoding: every call runs against a
`Cache` (a fresh one when none is given), so self-attention always sees
`[cached keys | new keys]` under a causal mask aligned to the lower right.

The hook points where bridges and PEFT methods attach (all None on a plain GPT-2; LoRA instead
replaces Linear layers, captioning/peft/lora.py):
- `GPT2.past_kv`: () -> keys/values [P, n_layer, 2, C] placed in a fresh cache before the first
  token, "past" keys that every query may attend to (prefix tuning)
- `CausalSelfAttention.extra_attention`: (q, attn) -> an attention output added to the layer's
  own before its projection (the adaption prompt)
- `Block.after_attn`, `Block.after_mlp`: h -> h on each sublayer's output (bottleneck adapters)
- `Block.cross`: (x, visual, ...) -> a residual update from the image after self-attention
  (the cross-attention bridges, captioning/bridges.py)
Input embeddings placed before the text (a visual prefix, a soft prompt) are an argument of
`GPT2.forward`.
"""
import hashlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import InputError, load_failure
from common.torchfile import load_weights


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


class LayerCache:
    """Keys/values of one layer: self-attention so far, and the image's (computed once); `shared`,
    one dict for every layer of a Cache, keeps what all layers need, made once: the causal mask
    (attend), prefix tuning's key/values of all layers (captioning.peft.prefix)."""

    def __init__(self, shared=None):
        self.shared = {} if shared is None else shared
        self.k = None  # [B, n_head, L, head_dim]
        self.v = None
        self.cross_k = None  # [B, n_head, V, head_dim]
        self.cross_v = None

    def append(self, k, v):
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)
            v = torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class Cache:
    """Per-layer caches plus the number of text positions consumed (for wpe)."""

    def __init__(self, n_layer):
        shared = {}
        self.layers = [LayerCache(shared) for _ in range(n_layer)]
        self.text_len = 0
        self.started = False  # prefix tokens (visual prefix, soft prompt) go in only once

    def reorder(self, index):
        """Select batch rows (beam search): every cached tensor is indexed along dim 0."""
        for layer in self.layers:
            for name in ("k", "v", "cross_k", "cross_v"):
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.index_select(0, index))


def split_heads(x, n_head):
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(x):
    B, nh, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hd)


HAS_SDPA = hasattr(F, "scaled_dot_product_attention")   # torch >= 2.0; the course's 1.12 lacks it


def sdpa(q, k, v):
    """softmax(q k^T / sqrt(d)) v: torch's fused kernel where it exists, else written out."""
    if HAS_SDPA:
        return F.scaled_dot_product_attention(q, k, v)
    return ((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))).softmax(dim=-1) @ v


def attend(q, k, v, causal=False, capture=False, masks=None):
    """Scaled dot-product attention; with capture, also return the weights [B, nh, T, L].

    causal: query i (the i-th new token) sees every key up to and including its own place, the
    mask aligned to the lower right, so that past keys (a cache, prefix tuning) are seen by all.
    masks: a dict keeping the masks made, for the next layers (LayerCache.shared).
    Without torch's SDPA (torch < 2.0) the weights are computed as for capture."""
    n_query, n_key = q.size(2), k.size(2)
    causal = causal and n_query > 1  # a single new token sees every key
    capture_path = capture or not HAS_SDPA
    mask = None
    if causal and (capture_path or n_query < n_key):
        # Additive (0 / -inf in q's dtype): what SDPA would turn a boolean mask into in every
        # layer, the same numbers; made once per shape and dtype for all layers.
        masks = {} if masks is None else masks
        key = (n_query, n_key, q.device, q.dtype)
        if key not in masks:
            seen = causal_mask(n_query, n_key, q.device)
            masks[key] = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~seen, float("-inf"))
        mask = masks[key]
    if not capture_path:
        # Square (training, a first step): SDPA's is_causal aligns to the upper left, which is then
        # the lower right, and needs no mask tensor built per layer (on a GPU: the flash kernel).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=causal and mask is None), None
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if mask is not None:
        att = att + mask
    att = att.softmax(dim=-1)
    return att @ v, (att if capture else None)


def causal_mask(n_query, n_key, device):
    """[n_query, n_key], True where query i may see key j: j <= (n_key - n_query) + i."""
    past = n_key - n_query
    i = torch.arange(n_query, device=device)[:, None]
    j = torch.arange(n_key, device=device)[None, :]
    return j <= past + i


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.extra_attention = None  # hook point (module docstring)

    def forward(self, x, layer_cache, capture=False):
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))
        k, v = layer_cache.append(k, v)
        y, att = attend(q, k, v, causal=True, capture=capture, masks=layer_cache.shared)
        if self.extra_attention is not None:
            y = y + self.extra_attention(q, self)
        return self.c_proj(merge_heads(y)), att


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.after_attn = self.cross = self.after_mlp = None  # hook points (module docstring)

    def forward(self, x, layer_cache, visual=None, capture=False, image_index=None):
        h, self_att = self.attn(self.ln_1(x), layer_cache, capture)
        if self.after_attn is not None:
            h = self.after_attn(h)
        x = x + h
        cross_att = None
        if self.cross is not None:
            h, cross_att = self.cross(x, visual, layer_cache, capture, image_index)
            x = x + h
        h = self.mlp(self.ln_2(x))
        if self.after_mlp is not None:
            h = self.after_mlp(h)
        return x + h, (self_att, cross_att)


class GPT2(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.past_kv = None  # hook point (module docstring)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size):
        """A cache holding only the `past_kv` keys/values (if any) of every layer."""
        cache = Cache(len(self.h))
        if self.past_kv is not None:
            kv = self.past_kv()   # [P, n_layer, 2, C], computed once for all layers
            for i, layer_cache in enumerate(cache.layers):
                layer_cache.append(*(split_heads(kv[None, :, i, j].expand(batch_size, -1, -1),
                                                 self.config.n_head) for j in (0, 1)))
        return cache

    def forward(self, idx, cache=None, prefix_embeds=None, visual=None, capture=False,
                logits_from=0, image_index=None):
        """Logits for the text tokens `idx` [B, T].

        prefix_embeds: [B, P, C] input embeddings placed before the text on the first call
            (visual prefix, soft prompt); they get no position embedding, so the text keeps
            the positions the language model was pretrained on.
        visual: what cross-attention bridges attend to (projected image tokens).
        image_index: [B] the row of `visual` each sequence reads (None: row b for sequence b).
        logits_from: compute logits only for text positions >= this (saves the lm_head).
        Returns logits [B, T - logits_from, V] and, with capture, per-layer attention weights.
        """
        B, T = idx.shape
        cache = cache if cache is not None else self.new_cache(B)
        if cache.text_len + T > self.config.block_size:
            raise ValueError(f"sequence of {cache.text_len + T} tokens exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(cache.text_len, cache.text_len + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        n_prefix = 0
        if prefix_embeds is not None and not cache.started:
            x = torch.cat([prefix_embeds.to(x.dtype), x], dim=1)
            n_prefix = prefix_embeds.size(1)
        cache.started = True
        attentions = []
        for block, layer_cache in zip(self.h, cache.layers):
            x, att = block(x, layer_cache, visual, capture, image_index)
            attentions.append(att)
        cache.text_len += T
        x = self.ln_f(x[:, n_prefix + logits_from:])
        logits = self.lm_head(x)
        return (logits, attentions) if capture else logits


# --- the course checkpoint format -------------------------------------------------------------

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The causal-mask buffers of HF-era files. Matched as whole names: a plain suffix test on
# "attn.bias" would also drop "attn.c_attn.bias".
IGNORED_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


class CheckpointError(InputError, ValueError):
    pass


def select_blocks(spec, n_layer, name):
    """The decoder blocks named by `spec`, sorted, each once: "all" or [] for every block, a
    block index or a list of them (-1: the last block). ValueError naming `name` for any other
    `spec` or a block the decoder does not have; n_layer None: only check the form."""
    indices = [spec] if isinstance(spec, int) and not isinstance(spec, bool) else spec
    if spec != "all" and not (isinstance(indices, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices)):
        raise ValueError(f"{name}={spec!r}: expected 'all', a block index or a list of them")
    if n_layer is None:
        return None
    if spec == "all" or spec == []:
        return list(range(n_layer))
    bad = [i for i in indices if not -n_layer <= i < n_layer]
    if bad:
        raise ValueError(f"{name} {bad} outside the decoder's {n_layer} blocks")
    return sorted({i % n_layer for i in indices})


def normalise_keys(sd, source="state dict"):
    """Drop the attention-mask buffers and a tied lm_head; accept an HF "transformer." prefix.

    An lm_head that is not a copy of wte would be silently replaced by the tie: refuse it."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
    head, wte = sd.get("lm_head.weight"), sd.get("wte.weight")
    if head is not None and (wte is None or not torch.equal(head, wte)):
        raise CheckpointError(f"{source}: 'lm_head.weight' differs from 'wte.weight'; GPT-2 ties "
                              "them, so this checkpoint's output layer cannot be loaded")
    return {k: v for k, v in sd.items()
            if not IGNORED_BUFFER.fullmatch(k) and k != "lm_head.weight"}


def config_from_state_dict(sd, n_head=12, source="state dict"):
    """Infer vocab, block size, width and depth from the tensors; n_head cannot be inferred.
    Every key and shape the config implies is checked against the file before anything is built
    on it: a crafted key (h.100000.ln_1.weight) or width cannot make the model allocate more
    than the file itself holds."""
    sd = normalise_keys(sd, source)
    for key in ("wte.weight", "wpe.weight"):
        if key not in sd:
            raise CheckpointError(f"{source}: no '{key}': not a GPT-2 state dict in the course "
                                  f"format (keys like {sorted(sd)[:3]})")
        if sd[key].dim() != 2:
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(sd[key].shape)}, "
                                  f"expected a 2-D (rows, n_embd) embedding")
    vocab_size, n_embd = sd["wte.weight"].shape
    block_size = sd["wpe.weight"].shape[0]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))}
    n_layer = len(layers)
    if layers and max(layers) != n_layer - 1:   # a gap: never build the blocks the file lacks
        gaps, expect = [], 0
        for i in sorted(layers):
            gaps += list(range(expect, min(i, expect + 5 - len(gaps))))
            expect = i + 1
        raise CheckpointError(f"{source}: keys name blocks up to h.{max(layers)}, but "
                              f"{max(layers) + 1 - n_layer} blocks are missing (e.g. "
                              f"{', '.join(f'h.{g}' for g in gaps[:5])}): not a GPT-2 in the "
                              "course format")
    try:
        config = GPT2Config(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                            n_head=n_head, n_embd=n_embd)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    check_course_tensors(sd, config, source)
    return config


def course_shapes(config):
    """{course key: shape as the course file stores it (Conv1D weights (in, out))}."""
    C = config.n_embd
    block = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C),
             "attn.c_attn.bias": (3 * C,), "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
             "ln_2.weight": (C,), "ln_2.bias": (C,), "mlp.c_fc.weight": (C, 4 * C),
             "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}
    shapes = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.block_size, C),
              "ln_f.weight": (C,), "ln_f.bias": (C,)}
    shapes.update({f"h.{i}.{k}": s for i in range(config.n_layer) for k, s in block.items()})
    return shapes


def check_course_tensors(sd, config, source="state dict"):
    """Every key of a course-format state dict (normalised) present, none more, each of the
    shape `config` implies; CheckpointError naming the first problems otherwise."""
    shapes = course_shapes(config)
    missing, unexpected = sorted(shapes.keys() - sd.keys()), sorted(sd.keys() - shapes.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys do not match GPT-2 ({config.n_layer} layers): "
                              f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                              f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for key, shape in shapes.items():
        if tuple(sd[key].shape) != shape:
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(sd[key].shape)}, expected "
                                  f"{shape} for n_embd={config.n_embd}")


def course_state_dict(model):
    """The decoder's own weights under the course's key names, Conv1D-shaped (in, out)."""
    sd = {}
    for key in sorted(course_shapes(model.config)):
        t = model.get_parameter(key).detach()
        if key.endswith(CONV1D_WEIGHTS):
            t = t.t()
        sd[key] = t.contiguous().clone()
    return sd


def weights_id(model):
    """sha256 of the decoder's own weights (the course's keys, by value, as fp32): what a
    trainable checkpoint records of the frozen decoder it was trained around. Modules attached
    since (a bridge, PEFT) do not change it."""
    h = hashlib.sha256()
    with torch.no_grad():
        for key in sorted(course_shapes(model.config)):
            t = model.get_parameter(key).detach().float().contiguous().cpu()
            h.update(f"{key}{tuple(t.shape)}".encode())
            h.update(t.numpy())
    return h.hexdigest()


def load_course_state_dict(model, sd, source="state dict"):
    """Copy a course-format state dict into `model` (a plain GPT2), checking every key and shape."""
    sd = normalise_keys(sd, source)
    check_course_tensors(sd, model.config, source)
    with torch.no_grad():
        for key in sorted(sd):
            t = sd[key]
            model.get_parameter(key).copy_(t.t() if key.endswith(CONV1D_WEIGHTS) else t)
    return model


def read_state_dict(path):
    """Read a .bin/.pt state dict safely (no pickled code runs), with errors naming the file."""
    try:
        sd = load_weights(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # truncated zip, pickle with code, not a torch file ...
        raise CheckpointError(f"{path}: cannot be read as a safe torch state dict "
                              f"({load_failure(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return sd


def load_course_checkpoint(path, n_head=12):
    """The course's decoder_model.bin (or the demo one) as a GPT2 in fp32."""
    sd = read_state_dict(path)
    config = config_from_state_dict(sd, n_head, source=str(path))
    model = GPT2(config)
    return load_course_state_dict(model, {k: v.float() for k, v in sd.items()}, source=str(path))
