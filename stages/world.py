"""The `world:` section of params.yaml, and the command that switches it between the demo world
and the course's real world:

    python -m stages.world real --data-root /path/to/hw3_data
    python -m stages.world demo

Every key of worlds/<name>.yaml replaces the same key of params.yaml (comments and the other
keys are kept); then `dvc repro` re-runs what depends on the changed values.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_open
from common.errors import run_stage


@dataclass
class World:
    """Where the data and the pretrained weights are: the demo world and the course's real world
    differ only here (README, "The two worlds")."""
    data_root: str
    decoder: str  # decoder_model.bin in the course format
    decoder_heads: int  # GPT-2's head count cannot be read off its tensors
    encoder_json: str
    vocab_bpe: str
    clip: str  # CLIP for zero-shot and CLIPScore: a name ("ViT-B/32") or a state-dict file

    def captions(self, split):
        """The captions file of p2 split `split` (train, val)."""
        return Path(self.data_root) / "p2_data" / f"{split}.json"

    def image_dir(self, split):
        if split == "p3":
            return Path(self.data_root) / "p3_data" / "images"
        return Path(self.data_root) / "p2_data" / "images" / split


def merge(target, overrides, fill):
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value, fill)
        else:
            target[key] = value.format(**fill) if isinstance(value, str) else value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", help="a file name in worlds/: demo or real")
    ap.add_argument("--data-root", help="the course's hw3_data folder (real world)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    source = Path("worlds") / f"{args.world}.yaml"
    if not source.is_file():
        sys.exit(f"{source}: no such world (have {sorted(p.stem for p in Path('worlds').glob('*.yaml'))})")
    text = source.read_text(encoding="utf-8")
    if "{data_root}" in text:
        if not args.data_root:
            sys.exit(f"{source} needs --data-root (the hw3_data folder)")
        root = Path(args.data_root)
        for part in ("p1_data", "p2_data", "p3_data"):
            if not (root / part).is_dir():
                sys.exit(f"{root}: no {part}/ inside: not the course's hw3_data folder")
    from ruamel.yaml import YAML   # DVC's own YAML library: it keeps comments and layout
    yaml = YAML()
    yaml.preserve_quotes = True
    params = yaml.load(Path(args.params).read_text(encoding="utf-8"))
    merge(params, yaml.load(text), {"data_root": str(args.data_root).rstrip("/")})
    with atomic_open(args.params, "w", encoding="utf-8") as f:
        yaml.dump(params, f)
    print(f"{args.params}: switched to the {args.world} world; now run `dvc repro`")


if __name__ == "__main__":
    run_stage(main)
