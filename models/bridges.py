"""Bridges that let the frozen GPT-2 see the frozen image encoder's tokens.

- `cross`: cross-attention blocks inside chosen decoder blocks, attending to the projected
  visual tokens (what most students built). Changes the logits from the first step.
- `gated_cross`: the same behind a tanh gate initialised at zero (Flamingo), so training starts
  from the unchanged language model.
- `prefix`: visual tokens through an MLP, prepended to the text as input embeddings (LLaVA).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models.gpt2 import attend, merge_heads, split_heads

BRIDGES = ("cross", "gated_cross", "prefix")


@dataclass
class BridgeConfig:
    kind: str = "gated_cross"
    layers: list = field(default_factory=list)  # cross bridges: decoder blocks; [] = every block
    prefix_hidden: int = 0  # prefix bridge: MLP hidden width; 0 = 2 x n_embd

    def __post_init__(self):
        if self.kind not in BRIDGES:
            raise ValueError(f"bridge.kind={self.kind!r}: expected one of {BRIDGES}")

    def cross_layers(self, n_layer):
        """The decoder blocks with cross-attention, in block order (the order decoding captures them)."""
        layers = sorted(set(self.layers)) or list(range(n_layer))
        bad = [i for i in layers if not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"bridge.layers {bad} outside the decoder's {n_layer} blocks")
        return layers


class CrossAttention(nn.Module):
    """Pre-norm multi-head attention from text to image tokens, optionally behind tanh(gate)."""

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

    def __init__(self, visual_width, n_embd, hidden=0):
        super().__init__()
        if hidden:  # the visual-prefix bridge: a two-layer MLP (LLaVA-1.5)
            self.net = nn.Sequential(nn.Linear(visual_width, hidden), nn.GELU(),
                                     nn.Linear(hidden, n_embd))
        else:
            self.net = nn.Sequential(nn.Linear(visual_width, n_embd), nn.LayerNorm(n_embd))

    def forward(self, tokens):
        return self.net(tokens)


def attach_bridge(decoder, config, visual_width):
    """Add the bridge's modules to `decoder` (cross-attention) and return the projection."""
    n_embd, n_head = decoder.config.n_embd, decoder.config.n_head
    if config.kind == "prefix":
        return VisualProjection(visual_width, n_embd, config.prefix_hidden or 2 * n_embd)
    for i in config.cross_layers(decoder.config.n_layer):
        decoder.h[i].cross = CrossAttention(n_embd, n_head, gated=config.kind == "gated_cross")
    return VisualProjection(visual_width, n_embd)
