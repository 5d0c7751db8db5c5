"""Stage `report`: one Markdown page, report/README.md, with its figures: `python -m stages.report`.

Built from metrics/, live/, logs/, figures/, release/ and params.yaml only (reporting/report.py
says which files are required and which sections are optional). The folder is replaced whole,
atomically. Also writes, for DVC's plots (dvc.yaml), every variant's curves in one table per kind
(plots/variants/train.json, val.json) and the report's summary figures (plots/report/), so
that `dvc plots diff` compares runs by their curves and pictures.
"""
import argparse
import shutil
from pathlib import Path

from common.atomic import atomic_dir, write_json
from common.errors import run_stage
from common.params import from_section, load_params
from reporting.report import ReportConfig, build_report, variant_curves

PLOTS = Path("plots")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="report")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    config = from_section(ReportConfig, params.get("report"), f"{args.params}: report")
    with atomic_dir(Path(args.out)) as tmp:
        variants = build_report(Path("."), params, config, tmp)
        with atomic_dir(PLOTS / "report") as figures:
            for name in ("training_curves.png", "variant_scores.png", "gates.png"):
                if (tmp / "figures" / name).is_file():   # gates.png: only with a gated bridge
                    shutil.copyfile(tmp / "figures" / name, figures / name)
    for kind, rows in variant_curves(variants).items():
        write_json(PLOTS / "variants" / f"{kind}.json", rows)
    print(f"wrote {Path(args.out) / 'README.md'}")


if __name__ == "__main__":
    run_stage(main)
