"""Analytic FLOP counts (a multiply-add = 2 FLOPs) of what the benchmarks run, to express a
measured rate as a share of the GPU's peak. Matrix products only (layer norms, softmax, GELU,
the optimiser are left out: a few percent), padding positions counted (they are computed).

Training = forward + backward, where backward = the input gradients of every layer the gradient
passes through (~ the forward once more) + the weight gradients of the trainable matrices only
(~ their forward once more): frozen weights get no weight gradient, so a training step of a
frozen model with a few trainable matrices costs ~2x its forward, not the usual 3x.
"""
from dataclasses import dataclass

import torch

H100_BF16_DENSE = 989e12     # H100 SXM datasheet, dense bf16/fp16 tensor cores
H200_BF16_DENSE = 989e12     # H200 datasheet: the same dense bf16 peak as the H100 SXM (same die)


def gpu_peak(name):
    """(peak dense bf16 FLOP/s, what it is) for a CUDA device name; the H100 SXM's figure, said
    so, for a GPU without one here."""
    if "H200" in name:
        return H200_BF16_DENSE, "H200 dense bf16 datasheet peak, 989 TFLOP/s (= H100 SXM)"
    if "H100" in name:
        return H100_BF16_DENSE, "H100 SXM dense bf16 datasheet peak, 989 TFLOP/s"
    return H100_BF16_DENSE, f"H100 SXM dense bf16 peak, 989 TFLOP/s (no figure here for {name})"


def vit_forward(tokens, width, layers, patch, mlp_ratio=4):
    """One image through a ViT: patch embedding + `layers` pre-norm blocks."""
    patch_embed = 2 * (tokens - 1) * 3 * patch * patch * width
    per_layer = (2 * tokens * width * 3 * width + 2 * tokens * width * width    # qkv, proj
                 + 4 * tokens * tokens * width                                  # scores, mix
                 + 2 * 2 * tokens * width * mlp_ratio * width)                  # mlp
    return patch_embed + layers * per_layer


def encoder_forward(encoder):
    """FLOPs of one image through a evaluation.encoders.ImageEncoder: vit_forward for a ViT (depth
    read off the module); a CLIP ResNet tower (the demo CLIP) is counted by torch's FlopCounterMode
    on one forward."""
    if hasattr(encoder, "model"):
        layers, patch = len(encoder.model.blocks), encoder.model.patch_embed.patch_size[0]
    elif hasattr(encoder.visual, "transformer"):   # the openai CLIP ViT tower
        layers, patch = len(encoder.visual.transformer.resblocks), encoder.visual.conv1.kernel_size[0]
    else:
        from torch.utils.flop_counter import FlopCounterMode
        param = next(encoder.parameters())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            encoder(torch.zeros(1, 3, *encoder.image_size, device=param.device))
        return counter.get_total_flops()
    return vit_forward(encoder.num_tokens, encoder.width, layers, patch)


@dataclass
class CaptionerShape:
    n_layer: int
    n_embd: int
    vocab: int
    visual_tokens: int
    visual_width: int
    bridge: str = "gated_cross"
    cross_layers: int = 0          # cross bridges: blocks with cross-attention
    prefix_hidden: int = 0         # visual-prefix bridge MLP width
    method: str = "lora"
    lora_rank: int = 0
    lora_width: int = 0            # output width LoRA adds to per block (c_attn q,v: 2 x n_embd)
    adapter_size: int = 0
    adapter_per_block: int = 0
    prefix_length: int = 0         # prefix tuning keys per layer
    prompt_length: int = 0         # soft prompt input tokens
    adaption_length: int = 0

    @classmethod
    def of(cls, model):
        """The shape of a captioning.captioner.Captioner."""
        c, p, b = model.config.decoder, model.config.peft, model.config.bridge
        cross = sum(blk.cross is not None for blk in model.decoder.h)
        s = p.settings
        lora_width = 0
        if p.method == "lora" and "c_attn" in s.targets:
            lora_width = sum(s.qkv) * c.n_embd
        hidden = b.visual_prefix.hidden if b.kind == "visual_prefix" else 0
        return cls(n_layer=c.n_layer, n_embd=c.n_embd, vocab=c.vocab_size,
                   visual_tokens=model.config.visual_tokens, visual_width=model.config.visual_width,
                   bridge=b.kind, cross_layers=cross, prefix_hidden=hidden or 2 * c.n_embd,
                   method=p.method, lora_rank=s.rank if p.method == "lora" else 0,
                   lora_width=lora_width,
                   adapter_size=s.size if p.method == "adapter" else 0,
                   adapter_per_block=len(s.where) if p.method == "adapter" else 0,
                   prefix_length=s.length if p.method == "prefix_tuning" else 0,
                   prompt_length=s.length if p.method == "prompt_tuning" else 0,
                   adaption_length=s.length if p.method == "adaption_prompt" else 0)

    def _input_prefix(self):
        """Positions placed before the text (visual prefix, soft prompt)."""
        return (self.visual_tokens if self.bridge == "visual_prefix" else 0) + self.prompt_length

    def visual_forward(self):
        """Per image: the projection of the image tokens + cross-attention keys/values."""
        C, V, D = self.n_embd, self.visual_tokens, self.visual_width
        if self.bridge == "visual_prefix":
            return 2 * V * (D * self.prefix_hidden + self.prefix_hidden * C)
        return 2 * V * D * C + self.cross_layers * 2 * V * C * 2 * C

    def _token_forward(self, n_query, n_keys):
        """Per sequence: `n_query` new positions through every block against `n_keys` keys,
        without the lm_head. Returns (total, of which trainable matrices)."""
        C, L = self.n_embd, self.n_layer
        frozen = L * (2 * n_query * C * 3 * C + 2 * n_query * C * C + 16 * n_query * C * C
                      + 4 * n_query * n_keys * C)
        trainable = 0
        if self.cross_layers and self.bridge != "visual_prefix":
            trainable += self.cross_layers * (2 * 2 * n_query * C * C)        # q, proj
            frozen += self.cross_layers * 4 * n_query * self.visual_tokens * C  # scores, mix
        # x A^T ([C] -> r per enabled part) then a B^T per part (r -> C): r x lora_width each
        trainable += L * 2 * n_query * 2 * self.lora_rank * self.lora_width
        trainable += L * self.adapter_per_block * 2 * 2 * n_query * C * self.adapter_size
        frozen += L * 4 * n_query * self.adaption_length * C
        return frozen + trainable, trainable

    def train_per_caption(self, text_len, captions_per_image=1):
        """Training FLOPs of one caption padded to `text_len` positions (start token included), its
        image's share: a batch computes an image's projection and cross-attention keys/values
        once for its `captions_per_image` captions (training.loop.batch_loss)."""
        P = self._input_prefix()
        T = P + text_len
        fwd, trainable = self._token_forward(T, T + self.prefix_length)
        head = 2 * text_len * self.n_embd * self.vocab
        visual = self.visual_forward() / captions_per_image   # all trainable (projection, cross k/v)
        forward = fwd + head + visual
        return 2 * forward + trainable + visual

    def decode_per_image(self, steps, beams=1):
        """Forward FLOPs of decoding one image for `steps` tokens with `beams` rows (the first
        step runs one row: every beam is equal), with the key/value cache."""
        P = self._input_prefix() + self.prefix_length
        total = self.visual_forward()
        first, _ = self._token_forward(1 + self._input_prefix(), 1 + P)
        total += first + 2 * self.n_embd * self.vocab
        for s in range(1, steps):
            step, _ = self._token_forward(1, 1 + P + s)
            total += beams * (step + 2 * self.n_embd * self.vocab)
        return total


def share(flop_per_s, peak=H100_BF16_DENSE):
    return flop_per_s / peak
