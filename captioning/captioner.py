"""The captioning model: frozen image tokens -> bridge -> frozen GPT-2 with a PEFT method.

The image encoder is not part of this module: training reads its tokens from the feature
cache, and hw3_2.sh runs the encoder in front of it.

What starts unchanged (tests/test_captioner.py checks each, bit for bit):
- LoRA (B = 0), bottleneck adapters (`up` = 0) and the adaption prompt (gates = 0) leave the
  logits of the same captioner with PEFT method `none` unchanged, whatever the bridge.
- The gated cross-attention bridge (tanh(0) = 0), with one of those methods or none, gives the
  frozen decoder's own logits on the text, whatever the image.
- Not so: prefix tuning (its keys take attention weight from the text whatever their values),
  prompt tuning (the soft tokens are input tokens), the visual-prefix bridge (the image tokens are
  part of the sequence, so there is no text-only forward) and the ungated cross bridge.

Each module a bridge or PEFT method adds has a `role` ("lora", "cross-attention", ...): the
parameter counts per part of the model come from where a parameter lives.
"""
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioning.bridges import BRIDGE_ROLES, BridgeConfig, attach_bridge
from captioning.gpt2 import GPT2, GPT2Config
from captioning.peft import PeftConfig, apply_peft


@dataclass
class CaptionerConfig:
    decoder: GPT2Config
    visual_width: int
    visual_tokens: int
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    encoder_id: str = ""  # what produced the image tokens (evaluation/encoders.py)
    tokenizer_id: str = ""  # sha256 of encoder.json + vocab.bpe
    decoder_id: str = ""  # gpt2.weights_id of the frozen decoder ("": not recorded, not checked)

    def to_dict(self):
        return asdict(self)


def config_differences(a, b, prefix=""):
    """Names of the fields where two (nested) configs differ, with both values."""
    out = []
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if hasattr(x, "__dataclass_fields__") and type(x) is type(y):
            out += config_differences(x, y, prefix + f.name + ".")
        elif x != y:
            out.append(f"{prefix}{f.name}: {x!r} != {y!r}")
    return out


@dataclass
class ImageContext:
    """What the decoder needs of a batch of images, computed once per image."""
    visual: Optional[torch.Tensor]  # projected tokens for cross-attention
    prefix_embeds: Optional[torch.Tensor]  # [visual prefix | soft prompt] input embeddings, per sequence
    image_index: Optional[torch.Tensor] = None  # [B] the row of `visual` each sequence reads; None: its own

    @property
    def n_sequences(self):
        for t in (self.image_index, self.prefix_embeds, self.visual):
            if t is not None:
                return t.size(0)
        raise ValueError("an ImageContext without images")

    def select(self, index):
        """The context of sequences `index` (beam reordering, repeats)."""
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))
        if self.image_index is not None:
            return ImageContext(self.visual, pick(self.prefix_embeds), pick(self.image_index))
        return ImageContext(pick(self.visual), pick(self.prefix_embeds))


class Captioner(nn.Module):
    def __init__(self, config, decoder):
        """`decoder`: a GPT2 holding the pretrained weights (see gpt2.load_course_checkpoint)."""
        super().__init__()
        if config.decoder != decoder.config:
            raise ValueError("decoder weights do not fit the configuration: "
                             + "; ".join(config_differences(config.decoder, decoder.config)))
        added = [n for n, m in decoder.named_modules() if hasattr(m, "role")]
        added += ["past_kv"] if decoder.past_kv is not None else []
        if added:
            # Bridges and PEFT are attached to the decoder in place: a second Captioner on the
            # same GPT2 would stack its modules on (or silently replace) the first one's.
            raise ValueError(f"this GPT2 already carries a bridge or PEFT modules ({added[:3]}); "
                             "build each Captioner around a freshly loaded decoder")
        self.config = config
        self.decoder = decoder
        decoder.requires_grad_(False)
        # query_former: None unless the bridge's `queries` (then the projection reads its output)
        self.query_former, self.visual_proj = attach_bridge(decoder, config.bridge,
                                                            config.visual_width)
        self.prefix_tuning = None  # prefix tuning's PrefixEncoder (the decoder's past_kv)
        self.soft_prompt = None  # prompt tuning's soft tokens, placed before the text
        apply_peft(self, config.peft)

    def context(self, visual_tokens, image_index=None):
        """Project image tokens [N, V, D] for the chosen bridge (through its queries, if any), once
        per image. image_index: [B] the image of each of B sequences (None: B = N, one sequence
        per image)."""
        if image_index is not None and (image_index.dim() != 1 or image_index.is_floating_point()):
            raise ValueError(f"image_index: expected a 1-D tensor of image rows, got "
                             f"{image_index.dtype} of shape {tuple(image_index.shape)}")
        tokens = visual_tokens.to(self.visual_proj.net[0].weight.dtype)
        if self.query_former is not None:
            tokens = self.query_former(tokens)
        projected = self.visual_proj(tokens)
        B = len(projected) if image_index is None else len(image_index)
        prefix = []
        visual_prefix = self.config.bridge.kind == "visual_prefix"
        if visual_prefix:
            prefix.append(projected if image_index is None else projected.index_select(0, image_index))
        if self.soft_prompt is not None:
            prefix.append(self.soft_prompt(B).to(projected.dtype))
        return ImageContext(
            visual=None if visual_prefix else projected,
            prefix_embeds=torch.cat(prefix, dim=1) if prefix else None,
            image_index=None if visual_prefix else image_index)

    def new_cache(self, batch_size):
        return self.decoder.new_cache(batch_size)

    def forward(self, ctx, input_ids, cache=None, capture=False, logits_from=0):
        """Logits [B, T, V] of the text tokens, given an ImageContext (see `context`)."""
        return self.decoder(input_ids, cache=cache, prefix_embeds=ctx.prefix_embeds,
                            visual=ctx.visual, capture=capture, logits_from=logits_from,
                            image_index=ctx.image_index)

    def loss(self, visual_tokens, input_ids, targets, image_index=None):
        """The course's loss: inputs [eot, t1..tN, eot, pad..], targets [t1..tN, eot, -100..].
        visual_tokens [N, V, D]: the batch's images; image_index [B]: the image of each caption
        (None: caption b has image b), so an image's captions share its projection and keys/values.

        Logits are taken at text positions only, which is the same as giving every visual
        prefix and soft-prompt position the target -100, without running lm_head on them.
        """
        n_sequences = len(visual_tokens) if image_index is None else len(image_index)
        if n_sequences != len(input_ids):
            raise ValueError(f"{len(input_ids)} captions, but " + (
                f"{len(visual_tokens)} images and no image_index" if image_index is None else
                f"an image_index of {len(image_index)}"))
        logits = self(self.context(visual_tokens, image_index), input_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def visual_key_span(self):
        """Where the visual-prefix tokens sit among a self-attention layer's keys."""
        if self.config.bridge.kind != "visual_prefix":
            return None
        start = self.prefix_tuning.length if self.prefix_tuning is not None else 0
        return start, start + self.config.bridge.decoder_tokens(self.config.visual_tokens)

    def gates(self):
        """{decoder block: tanh(gate)} of a gated bridge's cross-attention ({} for the others)."""
        return {i: torch.tanh(b.cross.gate.detach().float()).item()
                for i, b in enumerate(self.decoder.h) if b.cross is not None and b.cross.gate is not None}

    # --- the trainable part -------------------------------------------------------------------

    def trainable_state_dict(self):
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def _role_of(self):
        """{id(parameter): the `role` of the innermost module with one that holds it}."""
        def roles(module, role):
            role = getattr(module, "role", role)
            yield from ((p, role) for p in module.parameters(recurse=False))
            for child in module.children():
                yield from roles(child, role)
        return {id(p): role for p, role in roles(self, PRETRAINED)}

    def peft_parameters(self):
        """{name: parameter} of the PEFT method's trainable parameters (the rest are the bridge's)."""
        role_of = self._role_of()
        return {n: p for n, p in self.named_parameters()
                if p.requires_grad and role_of[id(p)] not in BRIDGE_ROLES}

    def parameter_counts(self):
        """Trainable and frozen parameters per part of the model, as {part: (trainable, frozen)}:
        a trainable parameter belongs to the `role` of the innermost module with one that holds it,
        a frozen one to the pretrained decoder."""
        role_of = self._role_of()
        trainable, frozen = Counter(), Counter()
        for p in self.parameters():
            if p.requires_grad:
                trainable[role_of[id(p)]] += p.numel()
            else:
                frozen[PRETRAINED] += p.numel()
        return {k: (trainable[k], frozen[k]) for k in sorted(trainable.keys() | frozen.keys())}


PRETRAINED = "gpt2 (pretrained)"


def build_on_meta(config):
    """The Captioner with shapes only (no memory, no initialisation), for parameter accounting
    at any size, e.g. GPT-2 small with ViT-L/14 tokens, without loading any weights."""
    with torch.device("meta"):
        return Captioner(config, GPT2(config.decoder))

