from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class PrefixTuningConfig:
    length: int = 10  # key/value positions per layer
    hidden: int = 0  # reparametrising MLP width; 0 = the prefixes are trained directly

    def __post_init__(self):
        if self.length < 1 or self.hidden < 0:
            raise ValueError(f"peft.prefix_tuning: length={self.length} must be at least 1 and "
                             f"hidden={self.hidden} at least 0")


class PrefixEncoder(nn.Module):
    """Prefix tuning (Li & Liang): trainable keys/values prepended in every self-attention, as
    the decoder's `past_kv` (captioning/gpt2.py).

    With `hidden`, the prefixes are produced from a small embedding through an MLP (the paper's
    reparametrisation, which trains more stably); otherwise they are trained directly.
    """
    role = "prefix tuning"

    def __init__(self, decoder, config):
        super().__init__()
        c = decoder.config
        self.n_layer, self.n_embd = c.n_layer, c.n_embd
        self.length = config.length
        out = c.n_layer * 2 * c.n_embd
        if config.hidden:
            self.embedding = nn.Parameter(torch.randn(self.length, c.n_embd) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(c.n_embd, config.hidden), nn.Tanh(),
                                     nn.Linear(config.hidden, out))
        else:
            self.embedding = nn.Parameter(torch.randn(self.length, out) * 0.02)
            self.mlp = None

    def forward(self):
        """The keys/values of every layer: [length, n_layer, 2, n_embd]."""
        kv = self.mlp(self.embedding) if self.mlp is not None else self.embedding
        return kv.view(self.length, self.n_layer, 2, self.n_embd)


def attach_prefix_tuning(captioner, config):
    captioner.prefix_tuning = PrefixEncoder(captioner.decoder, config)
    # the decoder calls it for every new cache; a plain attribute, not a second registration
    captioner.decoder.past_kv = captioner.prefix_tuning.forward
