"""The `world:` section of params.yaml: where the data and the pretrained weights are.

The demo world and the course's real world differ only here (see README, "The two worlds").
"""
from dataclasses import dataclass
from pathlib import Path

from models.config import from_section
from models.gpt2 import load_course_checkpoint
from models.scoring import load_references
from models.tokenizer import Tokenizer


@dataclass
class World:
    data_root: str
    decoder: str  # decoder_model.bin in the course format
    decoder_heads: int  # GPT-2's head count cannot be read off its tensors
    encoder_json: str
    vocab_bpe: str
    clip: str  # CLIP for zero-shot and CLIPScore: a name ("ViT-B/32") or a state-dict file

    @classmethod
    def from_params(cls, params, source="params.yaml"):
        """The `world:` section of the params read from `source`."""
        return from_section(cls, params.get("world"), f"{source}: world")

    def tokenizer(self):
        return Tokenizer.from_files(self.encoder_json, self.vocab_bpe)

    def load_decoder(self):
        return load_course_checkpoint(self.decoder, n_head=self.decoder_heads)

    def references(self, split):
        return load_references(Path(self.data_root) / "p2_data" / f"{split}.json")

    def image_dir(self, split):
        if split == "p3":
            return Path(self.data_root) / "p3_data" / "images"
        return Path(self.data_root) / "p2_data" / "images" / split
