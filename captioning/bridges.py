"""Bridges that let the frozen GPT-2 see the frozen image encoder's tokens.

- `cross`: cross-attention blocks inside chosen decoder blocks (the `Block.cross` hook point),
  attending to the projected visual tokens (what most students built). Changes the logits from
  the first step.
- `gated_cross`: the same behind a tanh gate initialised at zero (Flamingo), so training starts
  from the unchanged language model.
- `visual_prefix`: visual tokens through an MLP, placed before the text as input embeddings
  (LLaVA).

What enters, for each of them (`queries`): the image tokens themselves (0), or N learned query
tokens that read them through a few transformer layers of their own (BLIP-2's Q-Former, without
its text side): a fixed number of visual tokens, whatever the encoder's.
"""
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn

from captioning.gpt2 import attend, merge_heads, select_blocks, split_heads


@dataclass
class QuerySettings:
    """What enters the bridge (every bridge has these settings)."""
    queries: int = 0  # 0: the image tokens; N: N learned queries that read them (QueryFormer)
    query_layers: int = 2  # the queries' transformer layers
    query_width: int = 256  # the queries' width: a multiple of 64 (heads of 64) or below 64 (one head)

    def __post_init__(self):
        if self.queries < 0 or self.query_layers < 1:
            raise ValueError(f"queries={self.queries}, query_layers={self.query_layers}: expected "
                             "queries >= 0 and query_layers >= 1")
        if self.query_width < 1 or (self.query_width > 64 and self.query_width % 64):
            raise ValueError(f"query_width={self.query_width}: expected a multiple of 64, or 1 to 63")


@dataclass
class CrossConfig(QuerySettings):
    layers: object = "all"  # decoder blocks with cross-attention: "all", an index or a list

    def __post_init__(self):
        super().__post_init__()
        select_blocks(self.layers, None, "bridge layers")


@dataclass
class GatedCrossConfig(CrossConfig):
    gate_init: float = 0.0  # every gate's initial value: 0 = Flamingo's (tanh(0) = 0)


@dataclass
class VisualPrefixConfig(QuerySettings):
    hidden: int = 0  # the projection MLP's hidden width; 0 = 2 x n_embd

    def __post_init__(self):
        super().__post_init__()
        if self.hidden < 0:
            raise ValueError(f"bridge.visual_prefix.hidden={self.hidden}: must be at least 0")


@dataclass
class BridgeConfig:
    """The `bridge:` section of params.yaml: each bridge's settings under its name; a variant
    chooses `kind` (a Captioner's config keeps only its kind's settings, `chosen`)."""
    kind: str = "gated_cross"
    cross: Optional[CrossConfig] = field(default_factory=CrossConfig)
    gated_cross: Optional[GatedCrossConfig] = field(default_factory=GatedCrossConfig)
    visual_prefix: Optional[VisualPrefixConfig] = field(default_factory=VisualPrefixConfig)

    def __post_init__(self):
        if self.kind not in BRIDGES:
            raise ValueError(f"bridge kind {self.kind!r}: expected one of {list(BRIDGES)}")
        if self.settings is None:
            raise ValueError(f"bridge.{self.kind}: the settings of the chosen bridge are missing")

    @property
    def settings(self):
        return getattr(self, self.kind)

    @classmethod
    def of(cls, kind, **settings):
        """The config of bridge `kind` with these settings (the rest its defaults)."""
        return cls(kind=kind, **{kind: SETTINGS[kind](**settings)}).chosen(kind)

    def chosen(self, kind):
        """The config of bridge `kind` alone (the others' settings None)."""
        return BridgeConfig(kind=kind, **{f.name: getattr(self, f.name) if f.name == kind
                                          else None for f in fields(self) if f.name != "kind"})

    def cross_layers(self, n_layer):
        """The decoder blocks with cross-attention, in block order (the order decoding captures
        them); [] for the visual prefix."""
        if self.kind == "visual_prefix":
            return []
        return select_blocks(self.settings.layers, n_layer, f"bridge.{self.kind}.layers")

    def decoder_tokens(self, visual_tokens):
        """How many visual tokens the decoder reads, of `visual_tokens` image tokens."""
        return self.settings.queries or visual_tokens


class CrossAttention(nn.Module):
    """Pre-norm multi-head attention from text to image tokens, optionally behind tanh(gate)."""
    role = "cross-attention"

    def __init__(self, n_embd, n_head, gate_init=None):
        """gate_init: the gate's initial value (None: no gate)."""
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.ln = nn.LayerNorm(n_embd)
        self.q = nn.Linear(n_embd, n_embd)
        self.kv = nn.Linear(n_embd, 2 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.gate = None if gate_init is None else nn.Parameter(torch.full((1,), float(gate_init)))

    def forward(self, x, visual, layer_cache, capture=False, image_index=None):
        """image_index: [B] the row of `visual` each sequence reads (None: its own row), so that
        an image read by several sequences (its captions in a training batch) has its keys and
        values computed once; the gradient of those sums over the sequences."""
        if layer_cache.cross_k is None:  # the image's keys/values: once per image
            kv = self.kv(visual)
            if image_index is not None:
                kv = kv.index_select(0, image_index)
            k, v = kv.split(self.n_embd, dim=2)
            layer_cache.cross_k = split_heads(k, self.n_head)
            layer_cache.cross_v = split_heads(v, self.n_head)
        q = split_heads(self.q(self.ln(x)), self.n_head)
        y, att = attend(q, layer_cache.cross_k, layer_cache.cross_v, capture=capture)
        y = self.proj(merge_heads(y))
        if self.gate is not None:
            y = torch.tanh(self.gate) * y
        return y, att


class VisualProjection(nn.Module):
    """Image tokens [B, V, D] to the decoder's width [B, V, C]."""
    role = "visual projection"

    def __init__(self, visual_width, n_embd, hidden=0):
        super().__init__()
        if hidden:  # the visual-prefix bridge: a two-layer MLP (LLaVA-1.5)
            self.net = nn.Sequential(nn.Linear(visual_width, hidden), nn.GELU(),
                                     nn.Linear(hidden, n_embd))
        else:
            self.net = nn.Sequential(nn.Linear(visual_width, n_embd), nn.LayerNorm(n_embd))

    def forward(self, tokens):
        return self.net(tokens)


class QueryBlock(nn.Module):
    """One pre-norm layer of the queries: self-attention among them, cross-attention to the image
    tokens, MLP."""

    def __init__(self, width, n_head, visual_width):
        super().__init__()
        self.width, self.n_head = width, n_head
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.self_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(visual_width, 2 * width)
        self.cross_proj = nn.Linear(width, width)
        self.ln_3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, image, capture=False):
        """(the queries after this layer, with capture their attention over the image [B, nh, N, V])"""
        heads = lambda t: split_heads(t, self.n_head)
        q, k, v = map(heads, self.qkv(self.ln_1(x)).split(self.width, dim=2))
        x = x + self.self_proj(merge_heads(attend(q, k, v)[0]))
        k, v = map(heads, self.kv(image).split(self.width, dim=2))
        y, att = attend(heads(self.q(self.ln_2(x))), k, v, capture=capture)
        x = x + self.cross_proj(merge_heads(y))
        return x + self.mlp(self.ln_3(x)), att


class QueryFormer(nn.Module):
    """Image tokens [B, V, D] to N learned queries [B, N, width] that read them in `layers`
    QueryBlocks (BLIP-2's Q-Former, without its text side). The bridge's projection then takes
    them to the decoder's width, as it would the image tokens."""
    role = "query former"

    def __init__(self, visual_width, queries, layers, width):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
        n_head = max(1, width // 64)
        self.blocks = nn.ModuleList([QueryBlock(width, n_head, visual_width) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)

    def forward(self, image):
        x = self.queries.to(image.dtype).expand(image.size(0), -1, -1)
        for block in self.blocks:
            x, _ = block(x, image)
        return self.ln(x)

    def image_attention(self, image):
        """[B, N, V]: each query's attention over the image tokens in the last layer, the mean of
        its heads: what carries attention over the queries back onto the image (attention maps)."""
        x = self.queries.to(image.dtype).expand(image.size(0), -1, -1)
        for block in self.blocks:
            x, att = block(x, image, capture=True)
        return att.mean(dim=1)


def attach_cross(decoder, config, visual_width, gate_init=None):
    n_embd, n_head = decoder.config.n_embd, decoder.config.n_head
    for i in select_blocks(config.layers, decoder.config.n_layer, "bridge layers"):
        decoder.h[i].cross = CrossAttention(n_embd, n_head, gate_init)
    return VisualProjection(visual_width, n_embd)


def attach_visual_prefix(decoder, config, visual_width):
    n_embd = decoder.config.n_embd
    return VisualProjection(visual_width, n_embd, config.hidden or 2 * n_embd)


BRIDGE_ROLES = {CrossAttention.role, VisualProjection.role, QueryFormer.role}
SETTINGS = {"cross": CrossConfig, "gated_cross": GatedCrossConfig,
            "visual_prefix": VisualPrefixConfig}
# kind -> attach(decoder, settings, visual_width): adds the bridge's modules to the decoder's hook
# points and returns the projection of the (image or query) tokens
BRIDGES = {"cross": attach_cross,
           "gated_cross": lambda decoder, config, width: attach_cross(decoder, config, width,
                                                                      config.gate_init),
           "visual_prefix": attach_visual_prefix}


def attach_bridge(decoder, config, visual_width):
    """Add the bridge's modules to `decoder`; return (the QueryFormer, None without queries; the
    projection of what it gives, or of the image tokens)."""
    settings = config.settings
    queries = None
    if settings.queries:
        queries = QueryFormer(visual_width, settings.queries, settings.query_layers,
                              settings.query_width)
        visual_width = settings.query_width
    return queries, BRIDGES[config.kind](decoder, settings, visual_width)
