"""Per-word attention maps over the image from captured decoder attention (HW3 problem 3).

`generate(..., capture=True)` gives, for every generated token, the attention of the query that
produced it over the image tokens: [n_tokens, n_captured_layers, n_head, V], where V counts the
encoder's prefix (class) tokens first and then the patches in row-major order (patch (r, c) is
token num_prefix_tokens + r * grid_w + c, as a ViT flattens its conv output). A bridge on learned
queries (`queries`) attends to them instead: its attention is carried onto the image tokens
through each query's attention over them in the queries' last layer (`caption_with_maps`). From
that:

1. layers: keep the decoder blocks named by `layers` ("all", "last", a block or a list of them;
   cross bridges capture only their cross-attention blocks, the visual-prefix bridge every
   block), reduce heads (`head_reduce`) and then layers
   (`layer_reduce`) with mean, sum or max;
2. drop the prefix (class) tokens and reshape the patches to the encoder's grid [gh, gw];
3. words: a GPT-2 BPE token whose text does not start with a space continues the word before it
   ("Ġ" marks the space); `word_merge` "mean" (default) averages the maps of a word's tokens,
   "sum" adds them, "none" keeps one panel per token. Words are thus exactly the
   whitespace-separated words of the caption. The end token, when generated, is the last panel;
4. upsample each grid map to the image the encoder saw (`encoder_view`: the preprocess' resize
   and centre crop) and overlay it as a heatmap, each panel on its own colour scale (its min to
   its max), since maps of different words differ in total mass (prefix bridge: not normalised).
"""
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from captioning.gpt2 import select_blocks
from common.atomic import atomic_path

REDUCE = ("mean", "sum", "max")
MERGE = ("mean", "sum", "none")
UPSAMPLE = ("bilinear", "nearest")
END_LABEL = "<|endoftext|>"


@dataclass
class AttentionMapConfig:
    layers: object = "all"  # "all" | "last" | a block index | a list of them; -1: the last block
    head_reduce: str = "mean"
    layer_reduce: str = "mean"
    word_merge: str = "mean"
    upsample: str = "bilinear"
    cmap: str = "jet"
    alpha: float = 0.5
    columns: int = 5

    def __post_init__(self):
        for name, allowed in (("head_reduce", REDUCE), ("layer_reduce", REDUCE),
                              ("word_merge", MERGE), ("upsample", UPSAMPLE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"visualize.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.layers != "last":
            select_blocks(self.layers, None, "visualize.layers")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"visualize.alpha={self.alpha}: expected a value in [0, 1]")
        if self.columns < 1:
            raise ValueError(f"visualize.columns={self.columns}: expected at least 1")


# --- layers and heads ---------------------------------------------------------------------------

def captured_blocks(model):
    """Decoder block index of each layer row of the captured attention (see decoding.py)."""
    n_layer = model.config.decoder.n_layer
    if model.visual_key_span() is not None:
        return list(range(n_layer))
    return model.config.bridge.cross_layers(n_layer)


def select_layers(spec, blocks, n_layer):
    """Positions (rows of the captured attention) of the decoder blocks named by `spec`: "all"
    (every block with attention over the image), "last" (the last of those), or what
    captioning.gpt2.select_blocks takes, each block named having attention over the image."""
    if spec == "all":
        return list(range(len(blocks)))
    if spec == "last":
        return [len(blocks) - 1]
    chosen = select_blocks(spec, n_layer, "visualize.layers")
    missing = [b for b in chosen if b not in blocks]
    if missing:
        raise ValueError(f"visualize.layers={spec!r}: block(s) {missing} have no attention over "
                         f"the image (blocks with it: {blocks})")
    return [blocks.index(b) for b in chosen]


def _reduce(x, how, dim):
    if how == "mean":
        return x.mean(dim)
    if how == "sum":
        return x.sum(dim)
    return x.amax(dim)


def reduce_attention(attention, positions, head_reduce="mean", layer_reduce="mean"):
    """[T, L, H, V] -> [T, V]: the chosen layer rows, heads reduced, then layers."""
    if attention.ndim != 4:
        raise ValueError(f"attention must be [tokens, layers, heads, image tokens], "
                         f"got {tuple(attention.shape)}")
    att = attention.float()[:, positions]
    return _reduce(_reduce(att, head_reduce, 2), layer_reduce, 1)


def patch_maps(token_attention, num_prefix_tokens, grid):
    """[N, V] over all image tokens -> [N, gh, gw] over the patches (prefix tokens dropped)."""
    gh, gw = grid
    V = token_attention.shape[-1]
    if V != num_prefix_tokens + gh * gw:
        raise ValueError(f"attention over {V} image tokens does not fit {num_prefix_tokens} prefix "
                         f"tokens + a {gh}x{gw} patch grid")
    return token_attention[..., num_prefix_tokens:].reshape(*token_attention.shape[:-1], gh, gw)


def upsample(maps, size, mode="bilinear"):
    """[N, gh, gw] grid maps -> [N, H, W] maps over the image (what is overlaid)."""
    x = torch.as_tensor(maps, dtype=torch.float32)[:, None]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=tuple(size), mode=mode, **kw)[:, 0]


def peak(map_hw):
    """(row, col) of the largest value of a 2-D map."""
    m = torch.as_tensor(map_hw)
    flat = int(m.flatten().argmax())
    return flat // m.shape[1], flat % m.shape[1]


# --- tokens to words ----------------------------------------------------------------------------

@dataclass
class Group:
    label: str  # the word (or token) as the panel title
    positions: list  # indices into the hypothesis' tokens
    is_end: bool = False


def group_tokens(tokenizer, tokens, merge="mean"):
    """Panels of a hypothesis: words (or single tokens with merge "none"), then the end token."""
    groups = []
    for i, tok in enumerate(tokens):
        if tok == tokenizer.eot_id:
            groups.append(Group(END_LABEL, [i], is_end=True))
            continue
        text = tokenizer.decode([tok])
        continues = (merge != "none" and groups and not groups[-1].is_end
                     and not text[:1].isspace())
        if continues:
            groups[-1].positions.append(i)
        else:
            groups.append(Group("", [i]))
    for g in groups:
        if not g.is_end:
            g.label = tokenizer.decode([tokens[i] for i in g.positions]).strip() or repr(
                tokenizer.decode([tokens[i] for i in g.positions]))
    return groups


def merge_groups(maps, groups, merge="mean"):
    """[T, ...] per-token maps -> [len(groups), ...]: each group's tokens averaged or summed."""
    out = []
    for g in groups:
        part = maps[g.positions]
        out.append(part.sum(0) if merge == "sum" else part.mean(0))
    return torch.stack(out)


@dataclass
class WordMaps:
    labels: list  # panel titles: words (or tokens), then the end token if generated
    maps: torch.Tensor  # [n_panels, gh, gw]
    ends: list  # per panel: is it the end token


def word_maps(model, tokenizer, hypothesis, num_prefix_tokens, grid, config):
    """The per-word grid maps of one generated caption (a Hypothesis with attention)."""
    if hypothesis.attention is None:
        raise ValueError("the hypothesis carries no attention: decode with capture=True")
    if len(hypothesis.tokens) == 0:
        raise ValueError("empty hypothesis: nothing to draw")
    blocks = captured_blocks(model)
    positions = select_layers(config.layers, blocks, model.config.decoder.n_layer)
    per_token = reduce_attention(hypothesis.attention, positions, config.head_reduce,
                                 config.layer_reduce)
    grid_maps = patch_maps(per_token, num_prefix_tokens, grid)
    groups = group_tokens(tokenizer, hypothesis.tokens, config.word_merge)
    return WordMaps([g.label for g in groups], merge_groups(grid_maps, groups, config.word_merge),
                    [g.is_end for g in groups])


# --- what the encoder saw ---------------------------------------------------------------------

_NOT_GEOMETRIC = ("ToTensor", "MaybeToTensor", "Normalize", "PILToTensor", "ConvertImageDtype",
                  "_convert_image_to_rgb", "ToNumpy", "MaybePILToTensor")


@dataclass
class View:
    """The image as the encoder saw it, and how its pixels map back to the original."""
    image: Image.Image
    scale: tuple  # (sx, sy): view pixels per original pixel before the crop
    offset: tuple  # (ox, oy): crop offset in resized pixels

    def to_original(self, x, y):
        """Original-image coordinates of a point (x, y) of the view (pixel units, continuous)."""
        return (x + self.offset[0]) / self.scale[0], (y + self.offset[1]) / self.scale[1]


def _size_pair(size):
    """(h, w) of a torchvision size argument."""
    if isinstance(size, int):
        return size, size
    size = list(size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def encoder_view(preprocess, image):
    """Apply only the geometric steps (Resize, CenterCrop) of an encoder's preprocess to a PIL image.

    Handles torchvision's Compose of Resize / CenterCrop followed by tensor conversion and
    normalisation (openai CLIP's and timm's eval transforms); any other step is an error rather
    than a silently misplaced overlay.
    """
    from torchvision import transforms as T
    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        raise ValueError(f"encoder preprocess {preprocess!r} is not a torchvision Compose")
    image = image.convert("RGB")
    sx = sy = 1.0
    ox = oy = 0.0
    for t in steps:
        name = getattr(t, "__name__", type(t).__name__)
        if isinstance(t, T.Resize):
            w, h = image.size
            image = t(image)
            fx, fy = image.size[0] / w, image.size[1] / h
            sx, sy, ox, oy = sx * fx, sy * fy, ox * fx, oy * fy
        elif isinstance(t, T.CenterCrop):
            w, h = image.size
            ch, cw = _size_pair(t.size)
            if cw > w or ch > h:
                raise ValueError(f"centre crop {cw}x{ch} larger than the resized image {w}x{h}")
            # torchvision's center_crop: top = round((h - ch) / 2), left = round((w - cw) / 2)
            left, top = int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))
            image = t(image)
            ox, oy = ox + left, oy + top
        elif name in _NOT_GEOMETRIC:
            continue
        else:
            raise ValueError(f"encoder preprocess step {name} is not understood: cannot tell "
                             "where the patches lie in the image")
    return View(image, (sx, sy), (ox, oy))


# --- figures ------------------------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=110):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)


def plot_attention_grid(path, image, word_maps_, config, title=""):
    """Original image + one overlaid heatmap per word (course template); returns the upsampled
    [n_panels, H, W] maps that were drawn. `image`: the encoder's view (PIL)."""
    plt = pyplot()
    H, W = image.size[1], image.size[0]
    drawn = upsample(word_maps_.maps, (H, W), config.upsample)
    n = 1 + len(word_maps_.labels)
    cols = min(config.columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows + (0.4 if title else 0)),
                             squeeze=False)
    pixels = np.asarray(image)
    for ax in axes.flat:
        ax.set_axis_off()
    axes.flat[0].imshow(pixels)
    axes.flat[0].set_title("(image)", fontsize=10)
    for ax, label, m in zip(list(axes.flat)[1:], word_maps_.labels, drawn):
        ax.imshow(pixels)
        m = m.numpy()
        lo, hi = float(m.min()), float(m.max())
        ax.imshow(m, cmap=config.cmap, alpha=config.alpha, vmin=lo, vmax=hi if hi > lo else lo + 1,
                  interpolation="nearest")
        ax.set_title(label, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    return drawn


def plot_layer_comparison(path, image, model, tokenizer, hypothesis, num_prefix_tokens, grid,
                          config, title=""):
    """One row per decoder block with attention over the image, one column per word: where each
    layer looks for each word (each panel on its own colour scale)."""
    plt = pyplot()
    blocks = captured_blocks(model)
    rows = [word_maps(model, tokenizer, hypothesis, num_prefix_tokens, grid,
                      dataclasses.replace(config, layers=[b])) for b in blocks]
    H, W = image.size[1], image.size[0]
    labels = rows[0].labels
    fig, axes = plt.subplots(len(blocks), len(labels), squeeze=False,
                             figsize=(1.9 * len(labels), 1.9 * len(blocks) + (0.4 if title else 0)))
    pixels = np.asarray(image)
    for r, (block, wm) in enumerate(zip(blocks, rows)):
        for c, m in enumerate(upsample(wm.maps, (H, W), config.upsample)):
            ax = axes[r][c]
            ax.set_axis_off()
            ax.imshow(pixels)
            m = m.numpy()
            lo, hi = float(m.min()), float(m.max())
            ax.imshow(m, cmap=config.cmap, alpha=config.alpha, vmin=lo,
                      vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            ax.set_title(f"block {block}: {labels[c]}" if c == 0 else labels[c], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def caption_with_maps(model, tokenizer, visual_tokens, decode_config, num_prefix_tokens, grid,
                      config):
    """Caption one image (tokens [V, D]) capturing attention: (caption text, Hypothesis, WordMaps)."""
    from captioning.decoding import caption_text, generate
    device = next(model.parameters()).device
    image = visual_tokens[None].float().to(device)
    hyp = generate(model, image, decode_config, tokenizer.eot_id, capture=True)[0]
    if model.query_former is not None:
        # the decoder attends to the learned queries: carried onto the image tokens through each
        # query's own attention over them (its last layer's), [T, L, nh, N] @ [N, V]
        with torch.no_grad():
            hyp.attention = hyp.attention @ model.query_former.image_attention(image)[0]
    hyp.attention = hyp.attention.cpu()
    return caption_text(tokenizer, hyp.tokens), hyp, word_maps(model, tokenizer, hyp,
                                                               num_prefix_tokens, grid, config)
