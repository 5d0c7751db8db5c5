import torch.nn as nn

from models.peft.config import chosen_layers


class Bottleneck(nn.Module):
    """Houlsby adapter on a sublayer's output: h + up(gelu(down(h))); `up` starts at zero."""

    def __init__(self, n_embd, size):
        super().__init__()
        self.down = nn.Linear(n_embd, size)
        self.up = nn.Linear(size, n_embd)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(nn.functional.gelu(self.down(h)))


def attach_adapters(decoder, config):
    n_embd = decoder.config.n_embd
    for i in chosen_layers(config.adapter_layers, decoder.config.n_layer, "adapter_layers"):
        if "attn" in config.adapter_where:
            decoder.h[i].adapter_attn = Bottleneck(n_embd, config.adapter_size)
        if "mlp" in config.adapter_where:
            decoder.h[i].adapter_mlp = Bottleneck(n_embd, config.adapter_size)
