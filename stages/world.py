"""Switch params.yaml between the demo world and the course's real world.

    python -m stages.world real --data-root /path/to/hw3_data
    python -m stages.world demo

Every key of worlds/<name>.yaml replaces the same key of params.yaml (comments and the other
keys are kept); then `dvc repro` re-runs what depends on the changed values.
"""
import argparse
import sys
from pathlib import Path

from ruamel.yaml import YAML

from models.atomic import atomic_open
from models.errors import run_stage


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
    yaml = YAML()
    yaml.preserve_quotes = True
    params = yaml.load(Path(args.params).read_text(encoding="utf-8"))
    merge(params, yaml.load(text), {"data_root": str(args.data_root).rstrip("/")})
    with atomic_open(args.params, "w", encoding="utf-8") as f:
        yaml.dump(params, f)
    print(f"{args.params}: switched to the {args.world} world; now run `dvc repro`")


if __name__ == "__main__":
    run_stage(main)
