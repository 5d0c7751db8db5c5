"""Stage `report`: one Markdown page, report/README.md, with its figures: `python -m stages.report`.

Built from metrics/, plots/, figures/, release/ and params.yaml only (reporting/report.py says which
files are required and which sections are optional). The folder is replaced whole, atomically.
"""
import argparse
from pathlib import Path

from common.atomic import atomic_dir
from common.errors import run_stage
from common.params import from_section, load_params
from reporting.report import ReportConfig, build_report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="report")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    config = from_section(ReportConfig, params.get("report"), f"{args.params}: report")
    with atomic_dir(Path(args.out)) as tmp:
        build_report(Path("."), params, config, tmp)
    print(f"wrote {Path(args.out) / 'README.md'}")


if __name__ == "__main__":
    run_stage(main)
