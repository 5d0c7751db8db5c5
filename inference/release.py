"""What the select stage releases (release/) and how hw3_2.sh and the visualize stage load it.

release/
  captioner.safetensors   the selected variant's trainable tensors + its CaptionerConfig
  encoder.json, vocab.bpe the vocabulary it was trained with
  selected.json           {variant, scores, encoder (EncoderConfig), decode, decoder_heads}
"""
from dataclasses import dataclass
from pathlib import Path

from captioning.checkpoint import load_captioner
from captioning.decoding import DecodeConfig
from evaluation.encoders import EncoderConfig, build_encoder, encoder_id
from common.errors import InputError, read_json
from common.params import from_section
from captioning.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


class ReleaseError(InputError, ValueError):
    pass


@dataclass
class Release:
    model: object  # Captioner, in eval mode
    tokenizer: Tokenizer
    encoder: object  # the frozen ImageEncoder it was trained on
    selected: dict  # selected.json

    def decode_config(self, overrides=None, source="release/selected.json: decode"):
        """The released decoding settings, with `overrides` (a dict) applied."""
        return from_section(DecodeConfig, {**self.selected["decode"], **(overrides or {})}, source)


def in_repository(path):
    """`path` made absolute against the repository when it is relative and names a file there."""
    if not Path(path).is_absolute() and (ROOT / path).exists():
        return str(ROOT / path)
    return path


def read_selected(release):
    """(selected.json as a dict, the released image encoder's EncoderConfig), its file paths made
    absolute against the repository (the demo CLIP, timm weights): hw3_2.sh runs anywhere."""
    selected_path = Path(release) / "selected.json"
    selected = read_json(selected_path, "missing: run `bash hw3_download.sh` (or `dvc repro "
                         "select`, `make pull-release`)", ReleaseError)
    missing = [k for k in ("encoder", "decode") if not isinstance(selected, dict) or k not in selected]
    if missing:
        raise ReleaseError(f"{selected_path}: no {' or '.join(map(repr, missing))} entry: "
                           "re-run `dvc repro select`")
    encoder_config = from_section(EncoderConfig, selected["encoder"], f"{selected_path}: encoder")
    if encoder_config.kind == "clip":
        encoder_config.name = in_repository(encoder_config.name)
    if encoder_config.weights is not None:
        encoder_config.weights = in_repository(encoder_config.weights)
    return selected, encoder_config


def load_release(release, decoder_bin, device="cpu"):
    """The released captioner around the frozen GPT-2 at `decoder_bin`, every part checked to fit:
    vocabulary (by content hash) and image encoder (by encoder id) against the checkpoint."""
    release = Path(release)
    selected, encoder_config = read_selected(release)
    model, _ = load_captioner(release / "captioner.safetensors", decoder_bin, device)
    tokenizer = Tokenizer.from_files(release / "encoder.json", release / "vocab.bpe")
    if tokenizer.identity != model.config.tokenizer_id:
        raise ReleaseError(f"{release}: encoder.json/vocab.bpe are not the checkpoint's vocabulary")
    encoder = build_encoder(encoder_config, device)   # first: a missing file is reported as such
    if encoder_id(encoder_config) != model.config.encoder_id:
        raise ReleaseError(f"image encoder {encoder_config.name}: not the one the checkpoint was "
                           f"trained on ({model.config.encoder_id})")
    return Release(model, tokenizer, encoder, selected)
