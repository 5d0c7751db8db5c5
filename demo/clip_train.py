"""Train the demo world's small CLIP contrastively, from scratch, on demo image/caption pairs.

What makes it learn shape (a prototype learned colour in 2 minutes but shape only to 0.3 after 8):
- the image tower is clip's ModifiedResNet (as in RN50). From scratch, ViTs of the same cost
  (clip's and timm's, sine-cosine positions or not) stayed near chance on shape even when trained
  supervised on shape alone for 150 steps, where the ResNet reached 0.96 in 50: convolutions see
  edges and corners from the first step, a ViT must first learn which patches are neighbours;
- a pool of extra single-object images (portraits drawn like p1 but from their own random
  stream, with captions such as "a photo of a red star") in every batch, besides the
  multi-object p2 scenes;
- hard negatives: the single-object part of a batch is drawn from a few colours only, so colour
  alone cannot tell its captions apart and the loss pays for shape;
- several images of the same (colour, shape) in a batch are all positives of each other's captions
  (a multi-positive target), not false negatives;
- a short text context (captions fit in ~34 CLIP tokens; with CLIP's causal mask the EOT output
  ignores later positions, so running on the first n tokens is exact) and warm-up + cosine decay.
A ViT tower (vision_layers an int) is still supported; its positional embedding can start as
2-D sine-cosine codes (pos_init).

The saved file is a plain fp32 state dict of `clip.model.CLIP` with context_length 77, which
`clip.load(path, jit=False)` and `evaluation.clip_io.load_clip` rebuild (heads are inferred from the
widths); its preprocess resizes the demo images to the tower's input_resolution.
"""
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # clip imports pkg_resources, which warns on import
    import clip
    from clip.model import CLIP

from demo import scenes
from common.atomic import atomic_open

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VOCAB_SIZE = 49408       # clip.tokenize's vocabulary; the EOT token 49407 is its last id
CONTEXT_LENGTH = 77      # clip.tokenize always returns 77 tokens


@dataclass
class DemoClipConfig:
    seed: int = 0
    # architecture, as clip.model.build_model infers it back from the file:
    # vision_layers an int: a ViT of that depth, heads = vision_width // 64;
    # vision_layers 4 ints: clip's ModifiedResNet (RN50 is [3, 4, 6, 3]), heads = vision_width * 32 // 64
    embed_dim: int = 128
    vision_width: int = 128
    vision_layers: Union[int, tuple] = 4
    vision_patch_size: int = 8   # ViT only
    input_resolution: int = 0    # the tower's input side (0 = the images' size); clip's preprocess resizes
    transformer_width: int = 128
    transformer_layers: int = 3
    pos_init: str = "sincos"     # visual positional embedding init: "sincos" (2-D) or "random" (CLIP's)
    # data mix
    n_single: int = 6000         # extra single-object training images (not the p1 images)
    single_frac: float = 0.5     # share of each batch taken from the single-object pool
    colours_per_batch: int = 2   # single-object part drawn from this many colours (0 = any colour)
    # optimisation
    batch_size: int = 128
    steps: int = 600
    lr: float = 1e-3
    min_lr_frac: float = 0.05    # cosine decays to lr * min_lr_frac
    warmup_steps: int = 40
    weight_decay: float = 0.1
    eval_every: int = 100        # zero-shot check on p1 for the training curve (0 = never)
    threads: int = 2
    template: str = "a photo of a {object}"   # the zero-shot prompt of the metric

    def __post_init__(self):
        def fail(name, why):
            raise ValueError(f"DemoClipConfig.{name}={getattr(self, name)!r}: {why}")

        if isinstance(self.vision_layers, (list, tuple)):
            self.vision_layers = tuple(self.vision_layers)
            if len(self.vision_layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in self.vision_layers):
                fail("vision_layers", "a ResNet tower needs 4 block counts >= 1, e.g. [1, 1, 1, 1]")
            if self.vision_width < 2 or self.vision_width % 2:
                fail("vision_width", "a ResNet tower needs an even width (CLIP infers heads = width * 32 // 64)")
        else:
            if self.vision_width <= 0 or self.vision_width % 64:
                fail("vision_width", "a ViT tower needs a positive multiple of 64 (CLIP infers heads = width // 64)")
            if self.vision_layers < 1 or self.vision_patch_size < 1:
                fail("vision_layers" if self.vision_layers < 1 else "vision_patch_size", "must be at least 1")
        if self.transformer_width <= 0 or self.transformer_width % 64:
            fail("transformer_width", "must be a positive multiple of 64 (CLIP infers heads = width // 64)")
        if self.input_resolution < 0:
            fail("input_resolution", "must be >= 0 (0 = the images' size)")
        for name in ("embed_dim", "transformer_layers", "batch_size", "steps", "threads"):
            if getattr(self, name) < 1:
                fail(name, "must be at least 1")
        if not 0.0 <= self.single_frac <= 1.0:
            fail("single_frac", "must be in [0, 1]")
        if self.single_frac > 0 and self.n_single < 1:
            fail("n_single", "must be at least 1 when single_frac > 0")
        if self.colours_per_batch < 0:
            fail("colours_per_batch", "must be >= 0")
        if self.pos_init not in ("sincos", "random"):
            fail("pos_init", "must be 'sincos' or 'random'")
        if self.lr <= 0:
            fail("lr", "must be positive")
        if not 0.0 <= self.min_lr_frac <= 1.0:
            fail("min_lr_frac", "must be in [0, 1]")
        if self.warmup_steps < 0 or self.eval_every < 0:
            fail("warmup_steps" if self.warmup_steps < 0 else "eval_every", "must be >= 0")

    @property
    def resnet(self):
        return isinstance(self.vision_layers, tuple)

    def model_resolution(self, image_size):
        """The side of the tower's input for images of `image_size` pixels."""
        res = self.input_resolution or image_size
        if self.resnet and res % 32:
            raise ValueError(f"DemoClipConfig.input_resolution={res}: a ResNet tower needs a multiple "
                             "of 32 (its attention pool sees a res // 32 grid)")
        if not self.resnet and res % self.vision_patch_size:
            raise ValueError(f"DemoClipConfig.vision_patch_size={self.vision_patch_size} does not divide "
                             f"the input resolution {res}")
        return res


def sincos_2d(grid, dim):
    """[grid * grid, dim] fixed 2-D sine-cosine position codes (row-major), as in MAE."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for t in (y.flatten(), x.flatten()):
        a = t[:, None].double() * omega[None]
        parts += [a.sin(), a.cos()]
    return torch.cat(parts, dim=1).float()


def build_clip(cfg, image_resolution):
    """A fresh clip.model.CLIP for `cfg` (context 77) taking image_resolution-pixel inputs.

    ViT only: with pos_init="sincos" the visual positional embedding starts as 2-D sine-cosine
    codes instead of noise, so the tower knows from step 0 which patches are neighbours."""
    if cfg.model_resolution(image_resolution) != image_resolution:
        raise ValueError(f"build_clip: image_resolution {image_resolution} is not the configured "
                         f"input_resolution {cfg.input_resolution}")
    model = CLIP(embed_dim=cfg.embed_dim, image_resolution=image_resolution,
                 vision_layers=cfg.vision_layers, vision_width=cfg.vision_width,
                 vision_patch_size=cfg.vision_patch_size, context_length=CONTEXT_LENGTH,
                 vocab_size=VOCAB_SIZE, transformer_width=cfg.transformer_width,
                 transformer_heads=cfg.transformer_width // 64,
                 transformer_layers=cfg.transformer_layers)
    if cfg.pos_init == "sincos" and not cfg.resnet:
        grid = image_resolution // cfg.vision_patch_size
        with torch.no_grad():
            pe = model.visual.positional_embedding
            pe[0].zero_()
            pe[1:] = 0.5 * sincos_2d(grid, pe.shape[1])
    return model


# ---------------------------------------------------------------------------------------------
# Data

@dataclass
class PairData:
    pixels: torch.Tensor     # uint8 [N, H, W, 3]
    tokens: torch.Tensor     # int64 [M, n_ctx]: every caption, cut after the longest one's EOT
    caption_start: np.ndarray   # image i owns captions caption_start[i] : caption_start[i+1]
    key: np.ndarray          # int [N]: class id (colour x shape) of single objects, -1 - i otherwise
    colour: np.ndarray       # int [N]: colour index of single objects, -1 otherwise


def _pixels(image, image_size, resolution, source):
    """uint8 [resolution, resolution, 3], resized as clip's preprocess does (bicubic, on the PIL image)."""
    if image.size != (image_size, image_size):
        raise ValueError(f"{source}: image is {image.size[0]}x{image.size[1]}, the demo world's "
                         f"images are {image_size}x{image_size}")
    image = image.convert("RGB")
    if resolution != image_size:
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


def tokenize(captions):
    """clip.tokenize (77 tokens) then cut to the longest caption: exact under the causal mask."""
    tokens = clip.tokenize(captions)   # raises if a caption exceeds 77 tokens
    n_ctx = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :n_ctx].contiguous()


def load_pairs(hw3_root, scene_cfg, n_single, resolution=None, progress=True):
    """p2 train scenes (from the files) + n_single freshly drawn single-object scenes, as pixels
    of the tower's input `resolution` (default: the images' size)."""
    p2 = Path(hw3_root) / "p2_data"
    meta = json.loads((p2 / "train.json").read_text())
    caps = {}
    for a in meta["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    size = scene_cfg.image_size
    res = resolution or size
    pixels, captions, starts, keys, colours = [], [], [0], [], []
    for i, im in enumerate(tqdm(meta["images"], desc="read p2 train", disable=not progress, leave=False)):
        path = p2 / "images" / "train" / im["file_name"]
        with Image.open(path) as img:
            pixels.append(_pixels(img, size, res, path))
        if im["id"] not in caps:
            raise ValueError(f"{p2 / 'train.json'}: image {im['file_name']} has no captions")
        captions += caps[im["id"]]
        starts.append(len(captions))
        keys.append(-1 - i)
        colours.append(-1)
    S = len(scene_cfg.shapes)
    for sc in tqdm(scenes.single_object_scenes(scene_cfg, n_single) if n_single else [],
                   desc="draw singles", disable=not progress, leave=False):
        ob = sc.objects[0]
        c, s = scene_cfg.colours.index(ob.colour), scene_cfg.shapes.index(ob.shape)
        pixels.append(_pixels(sc.image, size, res, "a drawn single-object scene"))
        captions += sc.captions
        starts.append(len(captions))
        keys.append(c * S + s)
        colours.append(c)
    return PairData(torch.stack(pixels), tokenize(captions), np.asarray(starts),
                    np.asarray(keys), np.asarray(colours))


def normalise(pixels_uint8):
    """uint8 [B, H, W, 3] -> what clip's preprocess gives for an image already at the model size."""
    x = pixels_uint8.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class BatchSampler:
    """Batches of (image index, caption index); the single-object part shares a few colours."""

    def __init__(self, data, cfg, rng):
        self.data, self.cfg, self.rng = data, cfg, rng
        self.scene_idx = np.flatnonzero(data.key < 0)
        self.single_idx = np.flatnonzero(data.key >= 0)
        self.by_colour = [self.single_idx[data.colour[self.single_idx] == c]
                          for c in np.unique(data.colour[self.single_idx])]
        n_single = round(cfg.batch_size * cfg.single_frac) if len(self.single_idx) else 0
        if not len(self.scene_idx):
            n_single = cfg.batch_size
        self.n_single, self.n_scene = n_single, cfg.batch_size - n_single

    def __call__(self):
        rng = self.rng
        parts = []
        if self.n_scene:
            parts.append(rng.choice(self.scene_idx, self.n_scene, replace=len(self.scene_idx) < self.n_scene))
        if self.n_single:
            k = self.cfg.colours_per_batch
            if k and k < len(self.by_colour):
                pool = np.concatenate([self.by_colour[c] for c in rng.choice(len(self.by_colour), k, replace=False)])
            else:
                pool = self.single_idx
            parts.append(rng.choice(pool, self.n_single, replace=len(pool) < self.n_single))
        idx = np.concatenate(parts)
        lo, hi = self.data.caption_start[idx], self.data.caption_start[idx + 1]
        cap = lo + (rng.random(len(idx)) * (hi - lo)).astype(np.int64)
        return torch.from_numpy(idx), torch.from_numpy(cap)


# ---------------------------------------------------------------------------------------------
# Model pieces

def encode_text_prefix(model, tokens):
    """model.encode_text for tokens cut to n <= 77 positions (exact: the mask is causal)."""
    n = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:n]
    x = x.permute(1, 0, 2)
    mask = model.build_attention_mask()[:n, :n].to(device=x.device, dtype=x.dtype)
    for blk in model.transformer.resblocks:
        h = blk.ln_1(x)
        x = x + blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + blk.mlp(blk.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ model.text_projection


def contrastive_loss(image_features, text_features, logit_scale, key):
    """Symmetric InfoNCE where pairs with the same non-negative key are positives too."""
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * img @ txt.t()
    same = (key[:, None] == key[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def lr_at(step, cfg):
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------
# Zero-shot check used for the training curve (the stage's metric uses evaluation/zeroshot.py)

@torch.no_grad()
def zero_shot_accuracy(model, pixels, labels, class_names, template="a photo of a {}"):
    was_training = model.training
    model.eval()
    tokens = tokenize([template.format(c) for c in class_names]).to(pixels.device)
    txt = F.normalize(encode_text_prefix(model, tokens), dim=-1)
    img = torch.cat([F.normalize(model.encode_image(normalise(pixels[i:i + 256])), dim=-1)
                     for i in range(0, len(pixels), 256)])
    pred = (img @ txt.t()).argmax(dim=-1)
    model.train(was_training)
    return (pred == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------

def train_clip(cfg, data, image_resolution, eval_set=None, progress=True, device="cpu"):
    """Train a fresh CLIP on `data` (PairData). Returns (model on the CPU, curve: list of dicts).

    eval_set: optional (pixels uint8, labels, class_names) checked every cfg.eval_every steps.
    The default and the tested path is the CPU; `device` exists for quick design sweeps.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, data, image_resolution, eval_set, progress, device)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg, data, image_resolution, eval_set, progress, device):
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    model = build_clip(cfg, image_resolution).float().train().to(device)
    pixels, tokens = data.pixels.to(device), data.tokens.to(device)
    if eval_set is not None:
        eval_set = (eval_set[0].to(device), eval_set[1].to(device), eval_set[2])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    sampler = BatchSampler(data, cfg, rng)
    key = torch.from_numpy(data.key).to(device)
    curve, t0 = [], time.time()
    bar = tqdm(range(cfg.steps), desc="train demo CLIP", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx, cap = sampler()
        idx, cap = idx.to(device), cap.to(device)
        loss = contrastive_loss(model.encode_image(normalise(pixels[idx])),
                                encode_text_prefix(model, tokens[cap]),
                                model.logit_scale, key[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        row = {"step": step + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
               "seconds": time.time() - t0}
        last = step + 1 == cfg.steps
        if eval_set is not None and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
            row["zeroshot_accuracy"] = zero_shot_accuracy(model, *eval_set)
            bar.set_postfix(loss=f"{row['loss']:.3f}", zs=f"{row['zeroshot_accuracy']:.2f}")
        curve.append(row)
    return model.cpu().eval(), curve


def save_clip(model, path):
    """A plain fp32 state dict: what clip.load(path, jit=False) and evaluation.clip_io read."""
    sd = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_open(path, "wb") as f:   # a file object: torch names the archive "archive",
        torch.save(sd, f)                # not after the (per-run) temporary file
    return Path(path)


def p1_eval_set(hw3_root, image_size, resolution=None):
    """(pixels uint8 [N,H,W,3] at `resolution`, labels [N], class names) from p1_data/val."""
    p1 = Path(hw3_root) / "p1_data"
    id2label = json.loads((p1 / "id2label.json").read_text())
    names = [id2label[str(k)] for k in range(len(id2label))]
    files = sorted((p1 / "val").glob("*.png"))
    pixels, labels = [], []
    for f in files:
        with Image.open(f) as img:
            pixels.append(_pixels(img, image_size, resolution or image_size, f))
        labels.append(int(f.name.split("_")[0]))
    return torch.stack(pixels), torch.tensor(labels), names
