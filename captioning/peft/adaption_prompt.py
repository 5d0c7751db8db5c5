from dataclasses import dataclass

import torch
import torch.nn as nn

from captioning.gpt2 import sdpa, select_blocks, split_heads


@dataclass
class AdaptionPromptConfig:
    length: int = 10  # prompt tokens per layer
    layers: object = "all"  # decoder blocks: "all", a block index or a list of them

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"peft.adaption_prompt.length={self.length}: must be at least 1")
        select_blocks(self.layers, None, "peft.adaption_prompt.layers")


class AdaptionPrompt(nn.Module):
    """LLaMA-Adapter: learned prompt tokens that each query attends to in a separate softmax,
    projected by the layer's own (frozen) key/value weights, added behind a zero-initialised gate
    per head, so training starts from the unchanged language model."""
    role = "adaption prompt"

    def __init__(self, n_embd, n_head, length):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.prompt = nn.Parameter(torch.randn(length, n_embd) * 0.02)
        self.gate = nn.Parameter(torch.zeros(n_head))

    def forward(self, q, attn):
        B, H, T, hd = q.shape
        kv = attn.c_attn(self.prompt[None])[..., self.n_embd:]  # the frozen k and v projections
        k, v = (split_heads(t, self.n_head)[0] for t in kv.split(self.n_embd, dim=2))  # [H, L, hd]
        # softmax(q k^T / sqrt(hd)) v with no mask: every position of every caption sees every
        # prompt token, so the batch folds into the query length (no broadcast over the batch)
        y = sdpa(q.transpose(0, 1).reshape(H, B * T, hd), k, v)
        return self.gate.view(1, -1, 1, 1) * y.view(H, B, T, hd).transpose(0, 1)


def attach_adaption_prompt(captioner, config):
    decoder = captioner.decoder
    c = decoder.config
    for i in select_blocks(config.layers, c.n_layer, "peft.adaption_prompt.layers"):
        decoder.h[i].attn.extra_attention = AdaptionPrompt(c.n_embd, c.n_head, config.length)
