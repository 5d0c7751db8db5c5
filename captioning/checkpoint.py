"""Checkpoints of the trainable part only, in safetensors (no pickle: loading runs no code).

The file holds exactly the tensors that train plus, in its metadata, the CaptionerConfig needed
to rebuild the model around the frozen decoder (bridge, PEFT method, encoder and tokenizer ids).
The metadata is ONE key holding one JSON object: safetensors writes its metadata map in hash
order, so two keys would make the same checkpoint's bytes differ from run to run (and DVC would
see a new file). Files with the earlier two keys ("config", "extra") are still read.
"""
import dataclasses
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from common.atomic import atomic_path
from captioning.captioner import Captioner, CaptionerConfig, config_differences
from captioning.gpt2 import CheckpointError, load_course_checkpoint, weights_id
from common.params import from_section


def save_trainable(model, path, extra=None):
    """Write the trainable tensors of `model` and its config (plus `extra` JSON metadata)."""
    tensors = {n: t.detach().cpu().contiguous() for n, t in model.trainable_state_dict().items()}
    metadata = {"captioner": json.dumps({"config": model.config.to_dict(), "extra": extra or {}},
                                        sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_checkpoint(path):
    """(config, tensors, extra) of a trainable checkpoint, with errors naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if "captioner" not in metadata and "config" not in metadata:
        raise CheckpointError(f"{path}: no model config in its metadata: not a captioner checkpoint")
    try:
        if "captioner" in metadata:
            info = json.loads(metadata["captioner"])
        else:   # written before the metadata became one key
            info = {"config": json.loads(metadata["config"]), "extra": json.loads(metadata.get("extra", "{}"))}
        config = from_section(CaptionerConfig, info["config"], "config")
        extra = info.get("extra", {})
    except (TypeError, ValueError, KeyError) as e:   # a ParamsError among them
        raise CheckpointError(f"{path}: its config cannot be read ({e})") from None
    return config, tensors, extra


def load_trainable(model, path):
    """Load a checkpoint's tensors into `model`, which must have the same config.

    Call before model.eval(). Every trainable tensor must arrive, nothing else may come.
    """
    config, tensors, extra = read_checkpoint(path)
    _copy_trainable(model, path, config, tensors)
    return extra


def _copy_trainable(model, path, config, tensors):
    """Copy a checkpoint's tensors (read from `path`) into `model`, after checking they fit."""
    if not config.decoder_id:   # a checkpoint from before decoder ids says nothing about it
        config = dataclasses.replace(config, decoder_id=model.config.decoder_id)
    diff = config_differences(config, model.config)
    if diff:
        raise CheckpointError(f"{path}: made for another model configuration: " + "; ".join(diff))
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
    with torch.no_grad():
        for name, param in expected.items():
            if tensors[name].shape != param.shape:
                raise CheckpointError(f"{path}: '{name}' has shape {tuple(tensors[name].shape)}, "
                                      f"the model expects {tuple(param.shape)}")
            param.copy_(tensors[name])


def load_captioner(path, decoder_bin, device="cpu"):
    """Rebuild a Captioner from a trainable checkpoint and the frozen decoder's course file."""
    config, tensors, extra = read_checkpoint(path)
    decoder = load_course_checkpoint(decoder_bin, n_head=config.decoder.n_head)
    if decoder.config != config.decoder:
        raise CheckpointError(f"{decoder_bin}: this decoder does not fit checkpoint {path}: "
                              + "; ".join(config_differences(config.decoder, decoder.config)))
    if config.decoder_id and weights_id(decoder) != config.decoder_id:
        raise CheckpointError(f"{decoder_bin}: not the decoder checkpoint {path} was trained "
                              "around (same shapes, other weights)")
    model = Captioner(config, decoder)
    _copy_trainable(model, path, config, tensors)
    return model.to(device).eval(), extra
