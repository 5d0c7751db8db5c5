"""LoRA through loralib. `merge_weights=False`: loralib merges B@A into the frozen weight on
eval() and subtracts it again on train(), so every validation pass during training would drift
the frozen weight by rounding. Unmerged, the frozen tensors stay bit-identical; the extra cost is
one rank-r product per layer."""
from dataclasses import dataclass, field

import loralib as lora
import torch
import torch.nn.functional as F

TARGETS = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["c_attn"])  # among TARGETS
    qkv: list = field(default_factory=lambda: [True, False, True])  # c_attn's parts: q, k, v

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"peft.lora.targets {bad}: expected among {list(TARGETS)}")
        if len(self.qkv) != 3 or not all(isinstance(b, bool) for b in self.qkv):
            raise ValueError(f"peft.lora.qkv={self.qkv}: expected three flags (q, k, v)")
        if self.rank < 1:
            raise ValueError(f"peft.lora.rank={self.rank}: must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"peft.lora.dropout={self.dropout}: must be in [0, 1)")


class MergedLinear(lora.MergedLinear):
    """loralib's MergedLinear (same parameters, state-dict keys and merge rules) with a low-rank
    forward: out[..., part] += (x A_part^T) B_part^T * scaling for each enabled part of the output.

    loralib's own forward builds the dense update B@A [out, in] at every call and places it with
    a boolean-mask assignment; that is an extra full-width matrix product per layer (forward and
    backward), and on CUDA the mask's nonzero() makes the host wait for the GPU in every layer.
    Here the enabled parts' updates land in the output with one index_add instead of an in-place
    slice add per part, whose backward cloned and copied the output's gradient: the same sums
    bit for bit, with ~45% fewer operator calls forward and backward (a GPU step is bound by
    them, docs/performance.md). A single batched product of the parts would save a few more
    calls but sums B's gradient in another order (not bit-identical at training sizes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the enabled parts' positions among the output's parts: a buffer, so it moves with the
        # module to the GPU (a tensor made in forward would be a host-to-device copy per call)
        parts = [i for i, on in enumerate(self.enable_lora) if on]
        self.register_buffer("lora_parts", torch.tensor(parts, dtype=torch.long), persistent=False)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.r == 0 or self.merged or not any(self.enable_lora):
            return out
        width = self.out_features // len(self.enable_lora)
        low = self.lora_dropout(x) @ self.lora_A.T                         # [..., parts * r]
        parts = zip(low.split(self.r, dim=-1), self.lora_B.split(width))
        update = torch.stack([a @ b.T for a, b in parts], dim=-2) * self.scaling  # [..., parts, w]
        out = out.view(*x.shape[:-1], len(self.enable_lora), width)
        return out.index_add(-2, self.lora_parts, update).flatten(-2)


def _lora_linear(linear, config, enable=None):
    kwargs = dict(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                  merge_weights=False, bias=linear.bias is not None)
    if enable is None:
        new = lora.Linear(linear.in_features, linear.out_features, **kwargs)
    else:
        new = MergedLinear(linear.in_features, linear.out_features, enable_lora=enable, **kwargs)
    new.weight = linear.weight  # the frozen tensors themselves (lm_head's weight is tied to wte)
    new.bias = linear.bias
    assert not new.weight.requires_grad, "freeze the decoder before attaching LoRA"
    new.role = "lora"   # its trainable parameters are LoRA's, its frozen ones the decoder's
    return new.to(linear.weight.device)


def attach_lora(captioner, config):
    decoder = captioner.decoder
    targets = set(config.targets)
    for block in decoder.h:
        if "c_attn" in targets and any(config.qkv):
            block.attn.c_attn = _lora_linear(block.attn.c_attn, config, list(config.qkv))
        if "attn.c_proj" in targets:
            block.attn.c_proj = _lora_linear(block.attn.c_proj, config)
        if "mlp.c_fc" in targets:
            block.mlp.c_fc = _lora_linear(block.mlp.c_fc, config)
        if "mlp.c_proj" in targets:
            block.mlp.c_proj = _lora_linear(block.mlp.c_proj, config)
    if "lm_head" in targets:
        decoder.lm_head = _lora_linear(decoder.lm_head, config)
