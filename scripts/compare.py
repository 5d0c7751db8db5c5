"""Tables and plots of every sweep (scripts/sweep.py) against the baseline commit, from
`dvc exp show --json`: comparisons/<sweep>.json and .png, which the report stage shows.

    python -m scripts.compare            # then `dvc repro report`
    python -m scripts.compare lora_rank  # one sweep

Besides the scores each row gives the variant's training seconds, its val decoding speed
(captions/s) and the mean length of its val captions in words, read from the experiment's own outputs (`dvc.api`, the local cache).
"""
import argparse
import json
import sys

from reporting.experiments import write_comparisons
from scripts.dvc_command import dvc
from scripts.sweep import SWEEPS


def outputs_of(run, variant):
    """Training seconds, val decoding captions/s and mean caption length of `variant` in the
    experiment `run`."""
    import dvc.api
    extra = {"train_seconds": None, "decode_captions_per_second": None, "caption_words": None}
    for key, path, field in (("train_seconds", "logs/train", "train_seconds"),
                             ("decode_captions_per_second", "logs/decode", "val_captions_per_second")):
        try:
            extra[key] = json.loads(dvc.api.read(f"{path}/{variant}.json", rev=run["rev"])).get(field)
        except Exception:   # made at another commit, or not in this cache: the column stays empty
            pass
    try:
        captions = json.loads(dvc.api.read(f"predictions/{variant}/val.json", rev=run["rev"]))
        extra["caption_words"] = round(sum(len(c.split()) for c in captions.values())
                                       / max(len(captions), 1), 2)
    except Exception:
        pass
    return extra


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="*", metavar="SWEEP", help="default: every sweep")
    ap.add_argument("--out", default="comparisons")
    args = ap.parse_args(argv)
    shown = dvc("exp", "show", "--json", capture=True)
    done = write_comparisons(json.loads(shown), args.sweeps or list(SWEEPS), args.out, outputs_of)
    for sweep, rows in done.items():
        print(f"{args.out}/{sweep}.json: {len(rows)} rows")
    if not done:
        print("no experiments of any sweep: `python -m scripts.sweep NAME --run` first",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
