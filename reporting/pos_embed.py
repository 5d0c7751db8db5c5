"""The image encoder's learned positional embeddings: how similar each patch position is to all others.

Drawn as the ViT paper (Fig. 7) and the course's 2022 report draw it: a grid of small maps, the
map at (r, c) showing the cosine similarity of patch position (r, c) with every patch position.
"""
import torch
import torch.nn.functional as F

from reporting.attention_maps import pyplot, save_figure


def patch_positional_embeddings(encoder):
    """[gh * gw, D] positional embeddings of the patch positions (class/prefix positions dropped),
    row-major, of an ImageEncoder from evaluation/encoders.py (openai CLIP visual tower, ViT or
    ResNet, or timm ViT)."""
    gh, gw = encoder.grid
    n_patches = gh * gw
    if hasattr(encoder, "visual"):  # openai CLIP: [1 + gh*gw, D], a ResNet's in its attention pool
        visual = encoder.visual
        pe = visual.attnpool.positional_embedding if hasattr(visual, "attnpool") else visual.positional_embedding
    elif hasattr(encoder, "model") and getattr(encoder.model, "pos_embed", None) is not None:
        pe = encoder.model.pos_embed  # timm: [1, (prefix +) gh*gw, D]
    else:
        raise ValueError(f"{type(encoder).__name__}: no learned positional embedding "
                         "(visual.positional_embedding or pos_embed)")
    pe = pe.detach().float().reshape(-1, pe.shape[-1])
    if pe.shape[0] == n_patches:  # timm with no_embed_class: only the patches have positions
        return pe
    prefix = pe.shape[0] - n_patches
    if prefix != encoder.num_prefix_tokens:
        raise ValueError(f"{type(encoder).__name__}: {pe.shape[0]} positional embeddings for a "
                         f"{gh}x{gw} grid and {encoder.num_prefix_tokens} prefix tokens")
    return pe[prefix:]


def cosine_similarity_matrix(pe):
    """[N, N] cosine similarity of every position with every other."""
    x = F.normalize(torch.as_tensor(pe, dtype=torch.float32), dim=-1)
    return x @ x.T


def plot_similarity_grid(path, pe, grid, title="Positional embedding similarity"):
    """One small [gh, gw] map per patch position, laid out on the patch grid; returns the [N, N]
    similarity matrix drawn."""
    plt = pyplot()
    gh, gw = grid
    sim = cosine_similarity_matrix(pe)
    if sim.shape[0] != gh * gw:
        raise ValueError(f"{sim.shape[0]} positions do not fit a {gh}x{gw} grid")
    size = min(0.8, 14.0 / max(gh, gw))
    fig, axes = plt.subplots(gh, gw, figsize=(gw * size + 1.2, gh * size + 0.6), squeeze=False)
    image = None
    for r in range(gh):
        for c in range(gw):
            ax = axes[r, c]
            image = ax.imshow(sim[r * gw + c].reshape(gh, gw).numpy(), cmap="viridis",
                              vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(r + 1), fontsize=7, rotation=0, labelpad=6)
            if r == gh - 1:
                ax.set_xlabel(str(c + 1), fontsize=7)
    fig.supylabel("input patch row")
    fig.supxlabel("input patch column")
    fig.suptitle(title)
    fig.colorbar(image, ax=axes, shrink=0.6, label="cosine similarity")
    save_figure(fig, path)
    return sim
