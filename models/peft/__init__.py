"""Parameter-efficient fine-tuning of the frozen GPT-2, one file per method (as in peft).

`apply_peft(captioner, config)` attaches the chosen method's trainable modules. Each method
leaves every pretrained tensor frozen; what it adds is all that trains (with the bridge).
"""
from models.peft.adaption import attach_adaption_prompt
from models.peft.adapter import attach_adapters
from models.peft.config import PEFT_METHODS, PeftConfig
from models.peft.lora import attach_lora
from models.peft.prefix import PrefixEncoder
from models.peft.prompt import SoftPrompt

__all__ = ["PEFT_METHODS", "PeftConfig", "apply_peft"]


def apply_peft(captioner, config):
    decoder = captioner.decoder
    if config.method == "lora":
        attach_lora(decoder, config)
    elif config.method == "adapter":
        attach_adapters(decoder, config)
    elif config.method == "adaption":
        attach_adaption_prompt(decoder, config)
    elif config.method == "prefix":
        captioner.prefix_encoder = PrefixEncoder(decoder, config)
    elif config.method == "prompt":
        captioner.soft_prompt = SoftPrompt(decoder, config.prompt_length)
