"""Load an openai CLIP from a name ("ViT-B/32") or a checkpoint file, with its own preprocess.

A plain state-dict file is read without running any pickled code (common.torchfile), the
architecture is inferred from the tensor shapes exactly as `clip.model.build_model` does, and the
weights are loaded strictly into an fp32 `clip.model.CLIP` (clip.load would round them to fp16
first). A model name goes to `clip.load(..., jit=False)`, which takes openai's TorchScript
archive from its cache after checking its sha256. A TorchScript file given by path is refused:
loading one runs its code (and clip's fallback unpickles it without restriction).
"""
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from common.errors import InputError, load_failure
from common.torchfile import load_weights

with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # clip imports pkg_resources, which warns on import
    import clip
    from clip.clip import _transform
    from clip.model import CLIP

_META_KEYS = ("input_resolution", "context_length", "vocab_size")   # buffers of the JIT archives


class CheckpointError(InputError):
    """A CLIP checkpoint that cannot be used; str() names the file and the problem."""


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def clip_config_from_state_dict(sd):
    """The CLIP(...) constructor arguments implied by a state dict, as in clip.model.build_model.

    Heads are not stored in the tensors; CLIP's convention is width // 64, so widths must be
    multiples of 64."""
    if "visual.proj" in sd:
        vision_width = sd["visual.conv1.weight"].shape[0]
        vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        vision_patch_size = sd["visual.conv1.weight"].shape[-1]
        n_pos = sd["visual.positional_embedding"].shape[0]
        grid_size = round((n_pos - 1) ** 0.5)
        if grid_size ** 2 + 1 != n_pos:
            raise ValueError(f"visual.positional_embedding has {n_pos} rows, not a square grid + 1")
        image_resolution = vision_patch_size * grid_size
    else:
        vision_layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}")})
                              for b in (1, 2, 3, 4))
        vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
        n_pos = sd["visual.attnpool.positional_embedding"].shape[0]
        output_width = round((n_pos - 1) ** 0.5)
        if output_width ** 2 + 1 != n_pos:
            raise ValueError(f"visual.attnpool.positional_embedding has {n_pos} rows, not a square grid + 1")
        vision_patch_size = None
        image_resolution = output_width * 32
    transformer_width = sd["ln_final.weight"].shape[0]
    widths = {"text": transformer_width}
    if isinstance(vision_layers, int):   # a ViT; ResNet heads are width * 32 // 64
        widths["vision"] = vision_width
    for what, w in widths.items():
        if w % 64 or w == 0:
            raise ValueError(f"{what} width {w} is not a positive multiple of 64 "
                             "(CLIP infers heads = width // 64)")
    return dict(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=image_resolution, vision_layers=vision_layers,
        vision_width=vision_width, vision_patch_size=vision_patch_size,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=transformer_width, transformer_heads=transformer_width // 64,
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")}),
    )


def _read_state_dict(path):
    try:
        obj = load_weights(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError,
            zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({load_failure(e)})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a non-empty state dict (name -> tensor), "
                              f"got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict, non-tensor entries: {bad[:5]}")
    return {k: v for k, v in obj.items() if k not in _META_KEYS}


def _fmt_keys(keys, n=8):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def build_clip_from_state_dict(sd, source="state dict"):
    """An fp32 clip.model.CLIP holding exactly the tensors of `sd` (strict; eval mode)."""
    try:
        cfg = clip_config_from_state_dict(sd)
    except KeyError as e:
        raise CheckpointError(f"{source}: not a CLIP state dict, missing key {e}") from e
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"{source}: not a usable CLIP state dict ({e})") from e
    model = CLIP(**cfg)
    expected = model.state_dict()
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:5])}")
    if problems:
        raise CheckpointError(f"{source}: does not match the CLIP it describes ({cfg}): "
                              + " | ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model.float().eval()


def load_clip(name_or_path, device="cpu"):
    """(model, preprocess) for a CLIP name, a state-dict file or a TorchScript archive."""
    name_or_path = str(name_or_path)
    path = Path(name_or_path)
    if path.is_file():
        if _is_torchscript(path):
            raise CheckpointError(f"{path}: a TorchScript archive, whose loading runs its code: "
                                  "give the CLIP's name instead (e.g. ViT-B/32: clip.load checks "
                                  "openai's download), or a plain state-dict file")
        model = build_clip_from_state_dict(_read_state_dict(path), source=str(path)).to(device)
        return model, _transform(model.visual.input_resolution)
    if name_or_path in clip.available_models():
        cache = os.path.expanduser("~/.cache/clip")
        try:
            model, preprocess = clip.load(name_or_path, device=device, jit=False)
        except (OSError, RuntimeError) as e:   # urllib's URLError is an OSError
            raise CheckpointError(f"CLIP {name_or_path!r}: not in the download cache {cache} and "
                                  f"could not be downloaded ({e})") from e
        return model.eval(), preprocess
    if path.exists():
        raise CheckpointError(f"{path}: is not a file")
    raise CheckpointError(f"{name_or_path}: no such checkpoint file, and not a CLIP model name "
                          f"({', '.join(clip.available_models())})")
