"""Bridges that let the frozen GPT-2 see the frozen image encoder's tokens.

- `cross`: cross-attention blocks inside chosen decoder blocks (the `Block.cross` hook point),
  attending to the projected visual tokens (what most students built). Changes the logits from
  the first step.
- `gated_cross`: the same behind a tanh gate initialised at zero (Flamingo), so training starts
  from the unchanged language model.
- `visual_prefix`: visual tokens through an MLP, placed before the text as input embeddings
  (LLaVA).
"""
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn

from captioning.gpt2 import attend, merge_heads, select_blocks, split_heads


@dataclass
class CrossConfig:
    layers: object = "all"  # decoder blocks with cross-attention: "all", an index or a list

    def __post_init__(self):
        select_blocks(self.layers, None, "bridge layers")


@dataclass
class VisualPrefixConfig:
    hidden: int = 0  # the projection MLP's hidden width; 0 = 2 x n_embd

    def __post_init__(self):
        if self.hidden < 0:
            raise ValueError(f"bridge.visual_prefix.hidden={self.hidden}: must be at least 0")


@dataclass
class BridgeConfig:
    """The `bridge:` section of params.yaml: each bridge's settings under its name; a variant
    chooses `kind` (a Captioner's config keeps only its kind's settings, `chosen`)."""
    kind: str = "gated_cross"
    cross: Optional[CrossConfig] = field(default_factory=CrossConfig)
    gated_cross: Optional[CrossConfig] = field(default_factory=CrossConfig)
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


class CrossAttention(nn.Module):
    """Pre-norm multi-head attention from text to image tokens, optionally behind tanh(gate)."""
    role = "cross-attention"

    def __init__(self, n_embd, n_head, gated):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.ln = nn.LayerNorm(n_embd)
        self.q = nn.Linear(n_embd, n_embd)
        self.kv = nn.Linear(n_embd, 2 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.gate = nn.Parameter(torch.zeros(1)) if gated else None

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


def attach_cross(decoder, config, visual_width, gated=False):
    n_embd, n_head = decoder.config.n_embd, decoder.config.n_head
    for i in select_blocks(config.layers, decoder.config.n_layer, "bridge layers"):
        decoder.h[i].cross = CrossAttention(n_embd, n_head, gated)
    return VisualProjection(visual_width, n_embd)


def attach_visual_prefix(decoder, config, visual_width):
    n_embd = decoder.config.n_embd
    return VisualProjection(visual_width, n_embd, config.hidden or 2 * n_embd)


SETTINGS = {"cross": CrossConfig, "gated_cross": CrossConfig, "visual_prefix": VisualPrefixConfig}
# kind -> attach(decoder, settings, visual_width): adds the bridge's modules to the decoder's hook
# points and returns the projection of the image tokens
BRIDGES = {"cross": attach_cross,
           "gated_cross": lambda decoder, config, width: attach_cross(decoder, config, width, True),
           "visual_prefix": attach_visual_prefix}


def attach_bridge(decoder, config, visual_width):
    """Add the bridge's modules to `decoder` and return the projection of the image tokens."""
    return BRIDGES[config.kind](decoder, config.settings, visual_width)
