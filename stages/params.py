"""Stage `params`: check the WHOLE params.yaml before any other stage runs: `python -m stages.params`.

Each stage reads its own sections (common.params.from_section into the dataclass below); DVC
re-runs a stage only when a key it lists changes. So a misspelt key (`peft.rnak: 16`) would
change nothing and a bad value would be found only after DVC has deleted that stage's outputs.
This stage depends on every key of the file and every other stage depends on its output, so an
unknown section or key, or a value of the wrong type or out of range, stops `dvc repro` here
with one line naming it, before anything else runs. Its output, CHECKED, says only that.
"""
import argparse
from pathlib import Path

from captioning.bridges import BridgeConfig
from captioning.decoding import DecodeConfig
from captioning.peft import PeftConfig
from common.atomic import write_json
from common.errors import ParamsError, run_stage
from common.params import from_section, load_params
from demo.clip_train import DemoClipConfig
from demo.lm_pretrain import LMConfig
from demo.scenes import SceneConfig
from demo.vocab import VocabConfig
from evaluation.zeroshot import ZeroShotConfig
from reporting.report import ReportConfig
from stages.extract import ExtractConfig
from stages.score import ScoreConfig
from stages.variants import read_variants, variant_configs
from stages.visualize import VisualizeConfig
from stages.world import World
from training.loop import TrainConfig

CHECKED = Path(".params_checked")
# section -> (its dataclass, fields set elsewhere: a variant chooses the bridge kind and method)
SECTIONS = {
    "world": (World, ()), "train": (TrainConfig, ()), "bridge": (BridgeConfig, ("kind",)),
    "peft": (PeftConfig, ("method",)), "decode": (DecodeConfig, ()),
    "extract": (ExtractConfig, ()), "score": (ScoreConfig, ()),
    "visualize": (VisualizeConfig, ()), "zeroshot": (ZeroShotConfig, ()),
    "report": (ReportConfig, ()),
    "demo_data": (SceneConfig, ()), "demo_clip": (DemoClipConfig, ()),
    "demo_vocab": (VocabConfig, ()), "demo_gpt2": (LMConfig, ()),
}


def check_params(params, source):
    """Read every section (and every variant's bridge and PEFT configs); a ParamsError names the
    first problem. Returns the names of the sections read."""
    unknown = sorted(set(params) - set(SECTIONS) - {"variants"})
    if unknown:
        raise ParamsError(f"{source}: unknown section(s) {unknown}; known: "
                          f"{sorted([*SECTIONS, 'variants'])}")
    for name, (cls, exclude) in SECTIONS.items():
        from_section(cls, params.get(name), f"{source}: {name}", exclude)
    for name in read_variants(params, source):
        variant_configs(params, source, name)
    return sorted(params)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    check_params(load_params(args.params), args.params)
    write_json(CHECKED, {"checked": True})   # the same bytes every time: nothing after it re-runs
    print(f"{args.params}: every section and key checked")


if __name__ == "__main__":
    run_stage(main)
