"""A tiny world for running the stage scripts end to end in a scratch folder."""

import clip.model
import torch
import yaml

from demo.scenes import SceneConfig, write_hw3_data
from demo.vocab import read_captions, train_vocab, write_vocab
from captioning.gpt2 import GPT2, GPT2Config, course_state_dict
from captioning.tokenizer import Tokenizer


def world_section(data_root, clip, **paths):
    """A params.yaml `world:` section; the files a test's stages do not read need not exist."""
    return {"data_root": str(data_root), "clip": str(clip), "decoder": "unused/decoder_model.bin",
            "decoder_heads": 2, "encoder_json": "unused/encoder.json",
            "vocab_bpe": "unused/vocab.bpe", **{k: str(v) for k, v in paths.items()}}


def tiny_clip(path):
    torch.manual_seed(0)
    model = clip.model.CLIP(embed_dim=64, image_resolution=32, vision_layers=1, vision_width=64,
                            vision_patch_size=8, context_length=77, vocab_size=49408,
                            transformer_width=64, transformer_heads=1, transformer_layers=1)
    torch.save(model.state_dict(), path)


def build_tiny_world(root):
    """A scratch repository folder holding a tiny hw3_data, vocabulary, GPT-2 and CLIP, and a
    params.yaml for the captioning stages (run them with the folder as working directory)."""
    data = root / "hw3_data"
    write_hw3_data(data, SceneConfig(image_size=32, n_train=24, n_val=8, n_classes=4,
                                     n_p1_per_class=1), progress=False)
    p2 = data / "p2_data"
    encoder, merges = train_vocab(read_captions(p2 / "train.json"), 300)
    write_vocab(encoder, merges, p2)
    tok = Tokenizer.from_files(p2 / "encoder.json", p2 / "vocab.bpe")
    torch.manual_seed(0)
    gpt2 = GPT2(GPT2Config(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    torch.save(course_state_dict(gpt2), p2 / "decoder_model.bin")
    tiny_clip(root / "clip.pt")
    params = {
        "world": {"data_root": str(data), "decoder": str(p2 / "decoder_model.bin"),
                  "decoder_heads": 2, "encoder_json": str(p2 / "encoder.json"),
                  "vocab_bpe": str(p2 / "vocab.bpe"), "clip": str(root / "clip.pt")},
        "extract": {"encoder": {"kind": "clip", "name": str(root / "clip.pt")},
                    "splits": {"train": "p2_data/images/train", "val": "p2_data/images/val",
                               "p3": "p3_data/images"},
                    "clipscore_splits": ["val"], "batch_size": 8, "device": "cpu"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.003, "warmup_steps": 2,
                  "val_images": 4, "val_batch_size": 4},
        "bridge": {"gated_cross": {"layers": "all"}, "visual_prefix": {"hidden": 0}},
        "peft": {"lora": {"rank": 2}, "adapter": {"size": 4}, "prefix_tuning": {"length": 2}},
        "variants": {"lora": {"bridge": "gated_cross", "peft": "lora"},
                     "visual_prefix": {"bridge": "visual_prefix", "peft": "lora"}},
        "decode": {"method": "beam", "beam_size": 2, "max_new_tokens": 8, "batch_size": 4},
        "score": {"metrics": ["cider", "clipscore", "bleu4", "rougeL"]},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root
