import torch
import torch.nn as nn

from models.gpt2 import split_heads


class PrefixEncoder(nn.Module):
    """Prefix tuning (Li & Liang): trainable keys/values prepended in every self-attention.

    With `prefix_hidden`, the prefixes are produced from a small embedding through an MLP
    (the paper's reparametrisation, which trains more stably); otherwise they are trained directly.
    """

    def __init__(self, decoder, config):
        super().__init__()
        c = decoder.config
        self.n_layer, self.n_head, self.n_embd = c.n_layer, c.n_head, c.n_embd
        self.length = config.prefix_length
        out = c.n_layer * 2 * c.n_embd
        if config.prefix_hidden:
            self.embedding = nn.Parameter(torch.randn(self.length, c.n_embd) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(c.n_embd, config.prefix_hidden), nn.Tanh(),
                                     nn.Linear(config.prefix_hidden, out))
        else:
            self.embedding = nn.Parameter(torch.randn(self.length, out) * 0.02)
            self.mlp = None
        for i, block in enumerate(decoder.h):
            block.attn.prefix = PrefixHook(self, i)  # a plain callable, not a registered module

    def key_values(self):
        kv = self.mlp(self.embedding) if self.mlp is not None else self.embedding
        return kv.view(self.length, self.n_layer, 2, self.n_embd)


class PrefixHook:
    def __init__(self, encoder, layer):
        self.encoder, self.layer = encoder, layer

    def __call__(self, batch_size, shared):
        """This layer's (k, v); `shared` (one dict per decoder cache) keeps the key/values of
        every layer, so that the encoder (an MLP with prefix_hidden) runs once per forward."""
        if id(self.encoder) not in shared:
            shared[id(self.encoder)] = self.encoder.key_values()
        kv = shared[id(self.encoder)][:, self.layer]  # [P, 2, C]
        k, v = (split_heads(kv[None, :, j].expand(batch_size, -1, -1), self.encoder.n_head)
                for j in (0, 1))
        return k, v
