from dataclasses import dataclass, field

PEFT_METHODS = ("lora", "adapter", "prefix", "prompt", "adaption", "none")
LORA_TARGETS = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")


@dataclass
class PeftConfig:
    """One flat section, so that `dvc exp run -S peft.rank=16` touches only the LoRA branch."""
    method: str = "lora"
    # LoRA (loralib)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["c_attn"])
    lora_qkv: list = field(default_factory=lambda: [True, False, True])  # c_attn: q, k, v
    # bottleneck adapters (Houlsby)
    adapter_size: int = 64
    adapter_where: list = field(default_factory=lambda: ["attn", "mlp"])
    adapter_layers: list = field(default_factory=list)  # [] = every block
    # prefix tuning
    prefix_length: int = 10
    prefix_hidden: int = 0  # reparametrising MLP width; 0 = the prefixes are trained directly
    # prompt tuning
    prompt_length: int = 10
    # adaption prompt (LLaMA-Adapter)
    adaption_length: int = 10
    adaption_layers: list = field(default_factory=list)  # [] = every block

    def __post_init__(self):
        if self.method not in PEFT_METHODS:
            raise ValueError(f"peft.method={self.method!r}: expected one of {PEFT_METHODS}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"peft.lora_targets {bad}: expected among {LORA_TARGETS}")
        if len(self.lora_qkv) != 3:
            raise ValueError(f"peft.lora_qkv must be three flags (q, k, v), got {self.lora_qkv}")
        bad = [w for w in self.adapter_where if w not in ("attn", "mlp")]
        if bad:
            raise ValueError(f"peft.adapter_where {bad}: expected among ['attn', 'mlp']")
        for name in ("rank", "adapter_size", "prefix_length", "prompt_length", "adaption_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"peft.{name} must be >= 1, got {getattr(self, name)}")


def chosen_layers(layers, n_layer, name):
    layers = list(layers) or list(range(n_layer))
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"peft.{name} {bad} outside the decoder's {n_layer} blocks")
    return layers
