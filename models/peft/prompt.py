import torch
import torch.nn as nn


class SoftPrompt(nn.Module):
    """Prompt tuning (Lester et al.): trainable input embeddings placed before the text,
    initialised from randomly chosen rows of the vocabulary embedding."""

    def __init__(self, decoder, length):
        super().__init__()
        rows = torch.randint(0, decoder.config.vocab_size, (length,),
                             generator=torch.Generator().manual_seed(0))
        self.embeds = nn.Parameter(decoder.wte.weight.detach()[rows].clone())

    def forward(self, batch_size):
        return self.embeds[None].expand(batch_size, -1, -1)
