"""Stage `report`: one Markdown page, report/README.md, with its figures: `python -m stages.report`.

Built from metrics/, plots/, figures/, release/ and params.yaml only (models/report.py says which
files are required and which sections are optional). The folder is replaced whole, atomically.
"""
import argparse
from pathlib import Path

from models.atomic import atomic_dir
from models.config import load_params
from models.errors import run_stage
from models.report import build_report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="report")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    with atomic_dir(Path(args.out)) as tmp:
        build_report(Path("."), params, tmp)
    print(f"wrote {Path(args.out) / 'README.md'}")


if __name__ == "__main__":
    run_stage(main)
