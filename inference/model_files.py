"""The local files that loading a pretrained model reads: inputs that hw3_1.sh and hw3_2.sh must
never write their output over (common.atomic.check_writable).

- A CLIP given as a file is that file; a CLIP name ("ViT-B/32") is clip.load's download cache
  file, ~/.cache/clip/<the URL's file name>.
- A timm encoder with `weights` is that file; without, the cached files timm would load: its
  hub cache (~/.cache/huggingface/hub/models--<org>--<name>/snapshots/<rev>/<file>, a symlink
  into blobs/) and torch's download cache (<torch hub dir>/checkpoints/<the URL's file name>).

Only what is there is listed: a file that is not cached yet cannot be destroyed. Finding them
asks no network and never fails: anything unexpected (another timm, no huggingface_hub) lists
nothing, and the model's own loading reports its problems later. (Python 3.8: hand-in path.)
"""
import os
from pathlib import Path
from urllib.parse import urlparse

# The weight files timm reads from a hub repository (timm/models/_hub.py: HF_WEIGHTS_NAME,
# HF_SAFE_WEIGHTS_NAME and the open_clip pair), the safetensors ones first.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin")


def _existing(paths):
    return [Path(p) for p in paths if p and (os.path.lexists(p))]


def clip_files(name_or_path):
    """[the file] for a CLIP checkpoint path; [clip.load's cache file] for a CLIP name."""
    name_or_path = str(name_or_path)
    if os.path.lexists(name_or_path):
        return [Path(name_or_path)]
    from evaluation.clip_io import clip   # the package, its import warnings silenced
    url = getattr(clip.clip, "_MODELS", {}).get(name_or_path)
    if not url:
        return []
    # clip.load(name) with no download_root: ~/.cache/clip/<basename of the URL>
    return _existing([os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))])


def _hub_cached(repo, filenames):
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    repo, _, revision = repo.partition("@")   # timm's `org/name@revision`
    found = []
    for filename in filenames:
        try:
            path = try_to_load_from_cache(repo, filename, revision=revision or None)
        except Exception:   # an id the hub library refuses: nothing of it can be cached
            continue
        if isinstance(path, str):
            found.append(path)
    return _existing(found)


def _timm_pretrained_cfg(name):
    """timm's pretrained config for `name` (`arch` or `arch.tag`), as create_model resolves it,
    with the overlay evaluation.encoders.TimmEncoder adds for the quickgelu towers."""
    import timm
    from timm.models._builder import resolve_pretrained_cfg
    from timm.models._registry import split_model_name_tag
    arch, tag = split_model_name_tag(name)
    if not timm.models.is_model(arch):
        return {}
    overlay = None
    if "_quickgelu" in name:   # as TimmEncoder does for timm < 0.9.11
        overlay = dict(hf_hub_id="timm/" + name.replace("_quickgelu", ""))
    cfg = resolve_pretrained_cfg(arch, pretrained_cfg=tag or None, pretrained_cfg_overlay=overlay)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


def timm_files(name):
    """The cached weight files timm.create_model(name, pretrained=True) would read."""
    try:
        if name.startswith("hf-hub:"):   # a model given by its hub repository
            return _hub_cached(name[len("hf-hub:"):], HUB_WEIGHT_FILES)
        cfg = _timm_pretrained_cfg(name)
        found = _existing([cfg.get("file")])
        if cfg.get("hf_hub_id"):
            extra = cfg.get("hf_hub_filename")
            names = ((extra, extra[:-4] + ".safetensors") if extra and extra.endswith(".bin")
                     else (extra,) if extra else ())
            found += _hub_cached(cfg["hf_hub_id"], (*names, *HUB_WEIGHT_FILES))
        if cfg.get("url"):
            import torch.hub
            cached = os.path.join(torch.hub.get_dir(), "checkpoints",
                                  os.path.basename(urlparse(cfg["url"]).path))
            found += _existing([cached])
        return found
    except Exception:   # another timm's internals: list nothing, the load reports problems
        return []


def encoder_files(config):
    """The files that building the image encoder of an EncoderConfig reads."""
    if config.kind == "clip":
        return clip_files(config.name)
    if config.weights is not None:
        return [Path(config.weights)]
    return timm_files(config.name)
