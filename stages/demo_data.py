"""DVC stage demo_data: draw the demo world (images + captions) into data/demo/hw3_data.

    python -m stages.demo_data [--out data/demo/hw3_data] [--objects data/demo/p3_objects.json]

Reads params.yaml's `demo_data` section (demo.scenes.SceneConfig). The folder has the course's
hw3_data layout (p1_data, p2_data, p3_data) and is replaced atomically; --objects gets what the p3
images show (demo.scenes.p3_objects), which the visualize stage reads as `visualize.objects`.
"""
import argparse
import json

from common.atomic import write_json
from common.errors import run_stage
from demo.scenes import p3_objects, write_hw3_data
from common.params import from_section, load_params
from demo.scenes import SceneConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo/hw3_data")
    ap.add_argument("--objects", default="data/demo/p3_objects.json")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    cfg = from_section(SceneConfig, load_params(args.params).get("demo_data"),
                       f"{args.params}: demo_data")
    root = write_hw3_data(args.out, cfg)
    write_json(args.objects, p3_objects(cfg))
    n_caps = len(json.loads((root / "p2_data" / "train.json").read_text())["annotations"])
    print(f"demo world in {root}: {cfg.n_classes} classes x {cfg.n_p1_per_class} p1 images, "
          f"{cfg.n_train} train / {cfg.n_val} val scenes ({n_caps} training captions), 5 p3 images")


if __name__ == "__main__":
    run_stage(main)
