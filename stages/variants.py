"""The `variants:` section of params.yaml: each entry names a bridge and a PEFT method."""
from dataclasses import dataclass

from captioning.bridges import BridgeConfig
from captioning.peft import PeftConfig
from common.errors import ParamsError
from common.params import from_section


@dataclass
class Variant:
    """One trained captioner (an entry of `variants:`): a bridge kind and a PEFT method; the rest
    of the `bridge:` and `peft:` sections is shared by every variant."""
    bridge: str
    peft: str


def read_variants(params, source):
    """{name: Variant} of the `variants:` section of the params read from `source`."""
    variants = params.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ParamsError(f"{source}: variants: expected a mapping {{name: {{bridge, peft}}}}")
    return {name: from_section(Variant, v, f"{source}: variants.{name}")
            for name, v in variants.items()}


def variant_configs(params, source, name):
    """(BridgeConfig, PeftConfig) of variant `name` of the params read from `source`."""
    variants = read_variants(params, source)
    if name not in variants:
        raise ParamsError(f"{source}: no variant {name!r} under `variants:` (have {sorted(variants)})")
    v = variants[name]
    bridge = from_section(BridgeConfig, params.get("bridge"), f"{source}: bridge", ("kind",))
    peft = from_section(PeftConfig, params.get("peft"), f"{source}: peft", ("method",))
    try:
        return bridge.chosen(v.bridge), peft.chosen(v.peft)
    except ValueError as e:
        raise ParamsError(f"{source}: variants.{name}: {e}") from None
