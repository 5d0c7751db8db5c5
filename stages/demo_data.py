"""DVC stage demo_data: draw the demo world (images + captions) into data/demo/hw3_data.

    python -m stages.demo_data [--out data/demo/hw3_data] [--params params.yaml]

Reads params.yaml's `demo_data` section (demo.scenes.SceneConfig). The folder has the course's
hw3_data layout (p1_data, p2_data, p3_data; see DESIGN.md) and is replaced atomically.
"""
import argparse
import json

from demo.scenes import SceneConfig, write_hw3_data
from models.config import load_params
from models.errors import run_stage


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo/hw3_data")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if not isinstance(params.get("demo_data"), dict):
        raise SystemExit(f"{args.params}: missing the demo_data section")
    cfg = SceneConfig.from_dict(params["demo_data"], f"{args.params}: demo_data")
    root = write_hw3_data(args.out, cfg)
    n_caps = len(json.loads((root / "p2_data" / "train.json").read_text())["annotations"])
    print(f"demo world in {root}: {cfg.n_classes} classes x {cfg.n_p1_per_class} p1 images, "
          f"{cfg.n_train} train / {cfg.n_val} val scenes ({n_caps} training captions), 5 p3 images")


if __name__ == "__main__":
    run_stage(main)
