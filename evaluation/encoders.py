"""Frozen image encoders that return ALL tokens (class/prefix tokens + patch tokens).

`build_encoder(EncoderConfig(...))` gives an ImageEncoder: an nn.Module, frozen and always in eval
mode, whose `forward(images [B, 3, H, W]) -> [B, T, D]` returns every token after the encoder's
final norm, and which carries what later code needs to use those tokens:
  preprocess   PIL RGB image -> tensor [3, H, W], the encoder's own transform
  num_tokens   T = num_prefix_tokens + grid[0] * grid[1]
  num_prefix_tokens   tokens before the patches (1: the class token)
  width        D
  grid         (h, w) of the patch tokens: token num_prefix_tokens + r * w + c is patch (r, c)

LLaVA's choice of tokens is two options: `layer` "penultimate" (the second-to-last block's output,
before any norm; ViTs only) instead of "last", and `class_token` False (the prefix tokens
dropped: num_prefix_tokens 0). Both are part of `encoder_id` when not the default.

`EncoderConfig.precision` ("fp32", "fp16", "bf16") runs the forward under autocast to that dtype
(fp16 on a GPU is much faster: docs/performance.md); the tokens come back fp32.
It is part of `encoder_id`, so features and checkpoints of different precisions never mix.

Two kinds:
- "timm": any timm ViT-family model whose `forward_features` returns [B, T, D] (ViT, DeiT, EVA,
  BEiT, ...): all tokens after the final norm. `weights` is a local .pth/.safetensors file
  (timm's key format, or any format the model's own checkpoint_filter_fn converts, e.g. openai
  CLIP's `visual.*`); it is loaded with every key checked. Without `weights` timm downloads the
  pretrained weights of `name` (real world only; needs the network).
- "clip": the visual tower of an openai CLIP (`evaluation.clip_io.load_clip`: a name such as
  "ViT-L/14" or "RN50", or a checkpoint file).
  ViT towers: the package's `VisionTransformer.forward` keeps only the class token, so
  `ClipVisualEncoder.forward` re-runs the tower's own submodules up to the transformer output and
  applies `ln_post` to ALL tokens. The tokens are width-D (before `proj`): `proj` is the
  contrastive head of the class token only, and timm's CLIP towers also return width-D tokens
  after the final norm, so both kinds give the same tokens for the same weights.
  (`tokens[:, 0] @ visual.proj == model.encode_image(x)`; a test checks it.)
  ResNet towers (`ModifiedResNet`): the last stage's g x g feature map goes into CLIP's attention
  pool. Token 0 is that pool's output, the image embedding itself (`== encode_image(x)`); token
  1 + r * g + c is position (r, c), plus its positional embedding, sent through the pool's value
  and output projections alone
  (MaskCLIP's dense CLIP features, Zhou et al. 2022): what that position contributes to the pooled
  embedding, in the same space, without being mixed with the other positions.
"""
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from common.params import from_section
from common.errors import InputError, load_failure
from common.torchfile import load_weights
from common.precision import DTYPES, autocast


class EncoderError(InputError):
    """An encoder that cannot be built; str() names the model/file and the problem."""


@dataclass
class EncoderConfig:
    kind: str = "clip"                  # "timm" | "clip"
    name: str = "ViT-L/14"              # timm model name, or CLIP name / CLIP checkpoint path
    weights: Optional[str] = None       # timm only: local weights file (None: timm's download)
    image_size: Optional[int] = None    # timm only: img_size override (square)
    model_kwargs: dict = field(default_factory=dict)   # timm only: extra create_model kwargs
    precision: str = "fp32"             # "fp32" | "fp16" | "bf16": forward under autocast to it
    # "last": the tokens after the final norm | "penultimate": the second-to-last block's output,
    # before any norm (LLaVA's choice); ViTs only
    layer: str = "last"
    class_token: bool = True            # False: the prefix (class) tokens dropped, patches only

    def __post_init__(self):
        self.model_kwargs = dict(self.model_kwargs or {})
        if self.kind not in ("timm", "clip"):
            raise EncoderError(f"kind must be 'timm' or 'clip', got {self.kind!r}")
        if self.layer not in ("last", "penultimate"):
            raise EncoderError(f"layer must be 'last' or 'penultimate', got {self.layer!r}")
        if self.precision not in DTYPES:
            raise EncoderError(f"precision must be one of {sorted(DTYPES)}, "
                               f"got {self.precision!r}")
        if self.kind == "clip" and (self.weights or self.image_size or self.model_kwargs):
            raise EncoderError("weights/image_size/model_kwargs are timm options; "
                               "for kind 'clip' put the checkpoint path in `name`")


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encoder_id(cfg: EncoderConfig) -> str:
    """A stable string naming what determines the tokens: kind, name, weights (by content hash,
    not path), image size, extra kwargs. Stored in feature files and checkpoints."""
    ident = {"kind": cfg.kind, "name": cfg.name}
    weights = cfg.weights if cfg.kind == "timm" else cfg.name
    if weights is not None and Path(weights).is_file():
        ident["sha256"] = file_sha256(weights)
        if cfg.kind == "clip":
            del ident["name"]   # a checkpoint file: its content identifies it, not its path
    elif cfg.kind == "timm":
        if cfg.weights is not None:
            raise EncoderError(f"{cfg.weights}: timm weights file not found")
        ident["weights"] = "timm-pretrained"
    if cfg.image_size:
        ident["image_size"] = int(cfg.image_size)
    if cfg.model_kwargs:
        ident["model_kwargs"] = cfg.model_kwargs
    # other tokens; the defaults' ids stay what they were before these options
    if cfg.precision != "fp32":
        ident["precision"] = cfg.precision
    if cfg.layer != "last":
        ident["layer"] = cfg.layer
    if not cfg.class_token:
        ident["class_token"] = False
    return json.dumps(ident, sort_keys=True, separators=(",", ":"))


def as_cached(tokens):
    """Encoder tokens rounded as the feature cache stores them (float16), back in float32: what
    training and the decode stage see, so that captioning straight from images (hw3_2.sh) matches."""
    return tokens.to(torch.float16).float()


class ImageEncoder(nn.Module):
    """Common frozen behaviour; subclasses set the attributes and implement `tokens`."""
    preprocess = None
    autocast_dtype = None   # from EncoderConfig.precision
    penultimate = False   # EncoderConfig.layer
    dropped_prefix = 0   # leading tokens of tokens() that forward drops (class_token False)
    num_tokens: int
    num_prefix_tokens: int
    width: int
    grid: tuple
    image_size: tuple

    def _freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode=True):
        # Frozen means frozen: a parent's .train() must not switch on dropout/drop-path here.
        return super().train(False)

    def forward(self, images):
        """[B, 3, H, W] preprocessed images -> fp32 tokens [B, T, D]."""
        images = self._check_input(images)
        with autocast(images.device.type, self.autocast_dtype):
            tokens = self.tokens(images)
        return self._check(tokens[:, self.dropped_prefix:].float())

    def _options(self, cfg, has_layers):
        """Apply EncoderConfig.layer and class_token, once the subclass has set its attributes."""
        if cfg.layer == "penultimate" and not has_layers:
            raise EncoderError(f"{cfg.name}: layer 'penultimate' needs a ViT (a stack of blocks)")
        self.penultimate = cfg.layer == "penultimate"
        if not cfg.class_token:   # tokens() still computes them: forward drops them
            self.dropped_prefix, self.num_prefix_tokens = self.num_prefix_tokens, 0
            self.num_tokens = self.grid[0] * self.grid[1]

    def _check_input(self, images):
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.image_size:
            raise EncoderError(f"{type(self).__name__}: expected images [B, 3, "
                               f"{self.image_size[0]}, {self.image_size[1]}] (use .preprocess), "
                               f"got {tuple(images.shape)}")
        return images

    def _check(self, x):
        if x.shape[1:] != (self.num_tokens, self.width):
            raise EncoderError(f"{type(self).__name__}: got tokens {tuple(x.shape)}, expected "
                               f"[B, {self.num_tokens}, {self.width}]")
        return x


# --------------------------------------------------------------------------------------- timm
def _read_weights(path):
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"{path}: timm weights file not found")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch
            sd = safetensors.torch.load_file(str(path), device="cpu")
        else:
            sd = load_weights(path)
    except Exception as e:
        raise EncoderError(f"{path}: cannot read weights ({load_failure(e)})") from e
    for key in ("state_dict", "model"):   # common wrappers of training checkpoints
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderError(f"{path}: not a state dict of tensors")
    return sd


def _fmt(keys, n=8):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_timm_weights(model, path):
    """Load a local weights file into a timm model, every key checked.

    timm's own `pretrained_cfg_overlay=dict(file=...)` path loads with strict=False whenever
    num_classes differs from the pretrained head (always, with num_classes=0), so a file missing
    tensors would load silently; here a missing or unexpected key is an error that lists them.
    The model module's checkpoint_filter_fn (what timm applies too) converts other formats."""
    sd = _read_weights(path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as e:
            raise EncoderError(f"{path}: cannot convert to {type(model).__name__} "
                               f"({type(e).__name__}: {e})") from e
    classifier = model.pretrained_cfg.get("classifier") or ()
    for name in (classifier,) if isinstance(classifier, str) else classifier:
        sd.pop(name + ".weight", None)   # the classification head is dropped (num_classes=0)
        sd.pop(name + ".bias", None)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - sd.keys(), sd.keys() - expected.keys()
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    problems = ([f"missing keys: {_fmt(missing)}"] if missing else []) + \
               ([f"unexpected keys: {_fmt(unexpected)}"] if unexpected else []) + \
               ([f"wrong shapes: {'; '.join(wrong[:5])}"] if wrong else [])
    if problems:
        raise EncoderError(f"{path}: does not fit timm model {model.pretrained_cfg.get('architecture')}: "
                           + " | ".join(problems))
    model.load_state_dict(sd, strict=True)


class TimmEncoder(ImageEncoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        import timm
        from timm.data import create_transform, resolve_data_config
        kwargs = dict(cfg.model_kwargs)
        if cfg.image_size:
            kwargs["img_size"] = int(cfg.image_size)
        if cfg.weights is None and "_quickgelu" in cfg.name:
            # timm < 0.9.11 (the course's 0.9.10) looks for these weights in a hub repository named
            # after the quickgelu model, which holds none; they are the plain CLIP tower's (timm's
            # fix 7c685a4e gives this same repository)
            kwargs["pretrained_cfg_overlay"] = dict(hf_hub_id="timm/" + cfg.name.replace("_quickgelu", ""))
        try:
            model = timm.create_model(cfg.name, pretrained=cfg.weights is None, num_classes=0, **kwargs)
        except RuntimeError as e:
            raise EncoderError(f"timm model {cfg.name!r}: {e}") from e
        if cfg.weights is not None:
            load_timm_weights(model, cfg.weights)
        pe = getattr(model, "patch_embed", None)
        if pe is None or not hasattr(pe, "grid_size"):
            raise EncoderError(f"timm model {cfg.name!r} has no patch_embed.grid_size: "
                               "only ViT-family models (tokens [B, T, D]) are supported")
        self.model = model
        self.grid = tuple(int(g) for g in pe.grid_size)
        self.image_size = tuple(int(s) for s in pe.img_size)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.num_tokens = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        self.width = int(model.num_features)
        # The pretrained cfg describes the pretrained resolution; the model's own size wins.
        data_cfg = resolve_data_config({"input_size": (3, *self.image_size)}, model=model)
        self.data_config = data_cfg
        self.preprocess = create_transform(**data_cfg, is_training=False)
        self.autocast_dtype = DTYPES[cfg.precision]
        self._options(cfg, len(getattr(model, "blocks", ())) >= 2)
        self._freeze()

    def tokens(self, images):
        if not self.penultimate:
            return self.model.forward_features(images)
        # the second-to-last block's output, taken on the way (works for every timm ViT family)
        out = []
        hook = self.model.blocks[-2].register_forward_hook(lambda module, args, y: out.append(y))
        try:
            self.model.forward_features(images)
        finally:
            hook.remove()
        return out[0]


# --------------------------------------------------------------------------------------- CLIP
class ClipVisualEncoder(ImageEncoder):
    def __init__(self, cfg: EncoderConfig, device="cpu"):
        super().__init__()
        from evaluation.clip_io import CheckpointError, load_clip
        from clip.model import ModifiedResNet, VisionTransformer
        try:
            clip_model, preprocess = load_clip(cfg.name, device=device)
        except CheckpointError as e:   # callers handle EncoderError for every kind of encoder
            raise EncoderError(str(e)) from None
        visual = clip_model.visual
        self.visual = visual   # only the tower is kept
        res = int(visual.input_resolution)
        self.image_size = (res, res)
        self.num_prefix_tokens = 1
        if isinstance(visual, VisionTransformer):
            patch = int(visual.conv1.kernel_size[0])
            self.grid = (res // patch, res // patch)
            self.width = int(visual.conv1.out_channels)
        elif isinstance(visual, ModifiedResNet):
            self.grid = (res // 32, res // 32)
            self.width = int(visual.attnpool.c_proj.out_features)
        else:
            raise EncoderError(f"CLIP {cfg.name}: visual tower is {type(visual).__name__}, "
                               "neither a ViT nor a ModifiedResNet")
        self.num_tokens = 1 + self.grid[0] * self.grid[1]
        self.preprocess = preprocess
        self.autocast_dtype = DTYPES[cfg.precision]
        self._options(cfg, isinstance(visual, VisionTransformer) and len(visual.transformer.resblocks) >= 2)
        self._freeze()

    def tokens(self, images):
        if hasattr(self.visual, "attnpool"):
            return self._resnet_tokens(images)
        return self._vit_tokens(images)

    def _resnet_tokens(self, images):
        v = self.visual
        x = images.type(v.conv1.weight.dtype)
        # clip.model.ModifiedResNet.forward up to its attention pool
        x = v.relu1(v.bn1(v.conv1(x)))
        x = v.relu2(v.bn2(v.conv2(x)))
        x = v.avgpool(v.relu3(v.bn3(v.conv3(x))))
        x = v.layer4(v.layer3(v.layer2(v.layer1(x))))
        pool = v.attnpool
        pooled = pool(x)                                           # [B, D]: encode_image
        x = x.flatten(start_dim=2).permute(0, 2, 1)                # [B, g*g, C]
        x = x + pool.positional_embedding[1:].to(x.dtype)
        dense = pool.c_proj(pool.v_proj(x))                        # [B, g*g, D]
        return torch.cat([pooled[:, None], dense], dim=1)

    def _vit_tokens(self, images):
        v = self.visual
        # clip.model.VisionTransformer.forward, minus its last step's `x[:, 0, :]`.
        x = v.conv1(images.type(v.conv1.weight.dtype))                   # [B, width, gh, gw]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)   # [B, gh*gw, width]
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1],
                                                          dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        if self.penultimate:   # every block but the last, no final norm
            return v.transformer.resblocks[:-1](x.permute(1, 0, 2)).permute(1, 0, 2)
        x = v.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)   # the package's blocks are LND
        return v.ln_post(x)


def build_encoder(cfg, device="cpu") -> ImageEncoder:
    """A frozen ImageEncoder for an EncoderConfig (or a dict of its fields), on `device`."""
    if isinstance(cfg, dict):
        cfg = from_section(EncoderConfig, cfg, "encoder config")
    if cfg.kind == "timm":
        return TimmEncoder(cfg).to(device)
    if cfg.kind == "clip":
        return ClipVisualEncoder(cfg, device=device)
    raise EncoderError(f"encoder kind must be 'timm' or 'clip', got {cfg.kind!r}")
