"""Parameter-efficient fine-tuning of the frozen GPT-2, one file per method (as in peft): each
holds its settings (a dataclass) and `attach(captioner, settings)`, which adds the method's
trainable modules at the decoder's hook points (captioning/gpt2.py) or wraps its Linear layers.
Every pretrained tensor stays frozen; what a method adds is all that trains (with the bridge).
METHODS maps a method's name to its attach function; PeftConfig holds every method's settings.
"""
from dataclasses import dataclass, field, fields
from typing import Optional

from captioning.peft.adaption_prompt import AdaptionPromptConfig, attach_adaption_prompt
from captioning.peft.adapter import AdapterConfig, attach_adapters
from captioning.peft.lora import LoraConfig, attach_lora
from captioning.peft.prefix_tuning import PrefixTuningConfig, attach_prefix_tuning
from captioning.peft.prompt_tuning import PromptTuningConfig, attach_prompt_tuning


@dataclass
class NoPeftConfig:
    """`none`: the bridge alone trains (the course's "cross-attention only" baseline)."""


METHODS = {"none": lambda captioner, settings: None, "lora": attach_lora,
           "adapter": attach_adapters, "prefix_tuning": attach_prefix_tuning,
           "prompt_tuning": attach_prompt_tuning, "adaption_prompt": attach_adaption_prompt}


@dataclass
class PeftConfig:
    """The `peft:` section of params.yaml: each method's settings under its name, so that a
    variant (which names its method) depends only on its own, e.g. `peft.lora.rank`. The config
    of a Captioner keeps only its method's settings (`chosen`)."""
    method: str = "lora"
    none: Optional[NoPeftConfig] = field(default_factory=NoPeftConfig)
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)
    adapter: Optional[AdapterConfig] = field(default_factory=AdapterConfig)
    prefix_tuning: Optional[PrefixTuningConfig] = field(default_factory=PrefixTuningConfig)
    prompt_tuning: Optional[PromptTuningConfig] = field(default_factory=PromptTuningConfig)
    adaption_prompt: Optional[AdaptionPromptConfig] = field(default_factory=AdaptionPromptConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"peft method {self.method!r}: expected one of {list(METHODS)}")
        if self.settings is None:
            raise ValueError(f"peft.{self.method}: the settings of the chosen method are missing")

    @property
    def settings(self):
        return getattr(self, self.method)

    @classmethod
    def of(cls, method, **settings):
        """The config of `method` with these settings (the rest its defaults)."""
        kind = {f.name: f.default_factory for f in fields(cls) if f.name != "method"}[method]
        return cls(method=method, **{method: kind(**settings)}).chosen(method)

    def chosen(self, method):
        """The config of `method` alone (the other methods' settings None)."""
        return PeftConfig(method=method, **{f.name: getattr(self, f.name) if f.name == method
                                            else None for f in fields(self) if f.name != "method"})


def apply_peft(captioner, config):
    METHODS[config.method](captioner, config.settings)
