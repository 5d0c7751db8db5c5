from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class PromptTuningConfig:
    length: int = 10  # soft tokens placed before the text

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"peft.prompt_tuning.length={self.length}: must be at least 1")


class SoftPrompt(nn.Module):
    """Prompt tuning (Lester et al.): trainable input embeddings placed before the text,
    initialised from randomly chosen rows of the vocabulary embedding."""
    role = "prompt tuning"

    def __init__(self, decoder, length):
        super().__init__()
        # drawn on the CPU, so the choice is the same on every device and under any
        # torch.device(...) default (a CPU generator cannot draw on another device)
        rows = torch.randint(0, decoder.config.vocab_size, (length,), device="cpu",
                             generator=torch.Generator(device="cpu").manual_seed(0))
        weight = decoder.wte.weight.detach()
        self.embeds = nn.Parameter(weight[rows.to(weight.device)].clone())

    def forward(self, batch_size):
        return self.embeds[None].expand(batch_size, -1, -1)


def attach_prompt_tuning(captioner, config):
    captioner.soft_prompt = SoftPrompt(captioner.decoder, config.length)
