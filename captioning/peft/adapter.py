from dataclasses import dataclass, field

import torch.nn as nn

from captioning.gpt2 import select_blocks


@dataclass
class AdapterConfig:
    size: int = 64  # bottleneck width
    where: list = field(default_factory=lambda: ["attn", "mlp"])  # after which sublayers
    layers: object = "all"  # decoder blocks: "all", a block index or a list of them

    def __post_init__(self):
        bad = [w for w in self.where if w not in ("attn", "mlp")]
        if bad or not self.where:
            raise ValueError(f"peft.adapter.where={self.where}: expected some of ['attn', 'mlp']")
        if self.size < 1:
            raise ValueError(f"peft.adapter.size={self.size}: must be at least 1")
        select_blocks(self.layers, None, "peft.adapter.layers")


class Bottleneck(nn.Module):
    """Houlsby adapter on a sublayer's output: h + up(gelu(down(h))); `up` starts at zero."""
    role = "adapters"

    def __init__(self, n_embd, size):
        super().__init__()
        self.down = nn.Linear(n_embd, size)
        self.up = nn.Linear(size, n_embd)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(nn.functional.gelu(self.down(h)))


def attach_adapters(captioner, config):
    decoder = captioner.decoder
    n_embd = decoder.config.n_embd
    for i in select_blocks(config.layers, decoder.config.n_layer, "peft.adapter.layers"):
        if "attn" in config.where:
            decoder.h[i].after_attn = Bottleneck(n_embd, config.size)
        if "mlp" in config.where:
            decoder.h[i].after_mlp = Bottleneck(n_embd, config.size)
