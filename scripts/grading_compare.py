"""Compare what hw3_1.sh / hw3_2.sh wrote in the grading environment with the pipeline's own
predictions (`make grading-check`; runs in the project's .venv, which has the scorers).

    python scripts/grading_compare.py --csv OUT.csv --expected-csv predictions/p1.csv \
        --json OUT.json --expected-json predictions/<variant>/val.json --references val.json

Passes (exit 0) when the CSVs are identical, the captions are equal for at least --min-equal of
the images and the CIDEr-D of the two differs by at most --cider-tolerance; prints each number and
the captions that differ. Exit 1 otherwise, 2 on a usage error.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def compare_csv(got, expected):
    """(identical?, a line saying how they compare)."""
    a, b = Path(got).read_bytes(), Path(expected).read_bytes()
    if a == b:
        return True, f"identical ({len(a.splitlines()) - 1} rows)"
    rows_a, rows_b = a.decode().splitlines(), b.decode().splitlines()
    differ = sum(x != y for x, y in zip(rows_a, rows_b)) + abs(len(rows_a) - len(rows_b))
    return False, f"DIFFER: {differ} of {max(len(rows_a), len(rows_b)) - 1} rows"


def compare_captions(got, expected):
    """(names whose captions differ, names missing from `got`, extra names in `got`)."""
    differ = sorted(n for n in expected if n in got and got[n] != expected[n])
    return differ, sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", required=True)
    ap.add_argument("--expected-csv", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--expected-json", required=True)
    ap.add_argument("--references", required=True, help="the p2 split's captions (val.json)")
    ap.add_argument("--min-equal", type=float, default=0.98)
    ap.add_argument("--cider-tolerance", type=float, default=0.01)
    ap.add_argument("--show", type=int, default=10, help="differing captions to print")
    args = ap.parse_args(argv)

    from evaluation.scoring import load_references, score_captions
    ok = True
    same, line = compare_csv(args.csv, args.expected_csv)
    ok &= same
    print(f"hw3_1 CSV vs {args.expected_csv}: {line}")

    got = json.loads(Path(args.json).read_text(encoding="utf-8"))
    expected = json.loads(Path(args.expected_json).read_text(encoding="utf-8"))
    differ, missing, extra = compare_captions(got, expected)
    n = len(expected)
    equal = n - len(differ) - len(missing)
    print(f"hw3_2 captions vs {args.expected_json}: {equal} of {n} equal ({equal / n:.2%}), "
          f"{len(differ)} differ, {len(missing)} missing, {len(extra)} extra")
    for name in differ[:args.show]:
        print(f"  {name}: grading env {got[name]!r} | pipeline {expected[name]!r}")
    ok &= not missing and not extra and equal / n >= args.min_equal

    references = load_references(args.references)
    scores = {}
    for what, captions in (("grading env", got), ("pipeline", expected)):
        subset = {k: v for k, v in captions.items() if k in references}
        summary, _ = score_captions(subset, references, metrics=("cider",),
                                    allow_subset=len(subset) < len(references))
        scores[what] = summary["cider"]
    gap = abs(scores["grading env"] - scores["pipeline"])
    print(f"CIDEr-D: grading env {scores['grading env']:.4f}, pipeline {scores['pipeline']:.4f} "
          f"(difference {gap:.4f}, tolerance {args.cider_tolerance})")
    ok &= gap <= args.cider_tolerance
    print("grading-check: PASS" if ok else "grading-check: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
