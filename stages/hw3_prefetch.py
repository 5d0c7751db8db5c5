"""Fetch the pretrained weights that hw3_1.sh and hw3_2.sh load, so that both then run offline.

    python -m stages.hw3_prefetch [--release release] [--params params.yaml]

hw3_download.sh runs this once it has unpacked the release (`make pull-release` after `dvc pull
select`), with the network allowed. It loads the released captioner's image encoder
(release/selected.json) and the zero-shot CLIP (params.yaml `zeroshot.clip`) once, through the
same code hw3_2.sh and hw3_1.sh use: timm and CLIP download what is not in their caches yet
(~/.cache/huggingface, ~/.cache/clip). Local files (the demo world's CLIP, which the release
archive carries) are only checked to load. Exit status 0, or 1 with one line naming what failed.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class PrefetchError(Exception):
    pass


def prefetch(release, params):
    """Load both models once; returns a line per model saying what was loaded. Any failure is
    raised as a PrefetchError naming the model: downloads fail in many ways (proxies, dropped
    connections, a gated repository), none of which should end in a traceback."""
    from common.errors import InputError
    from evaluation.clip_io import load_clip
    from evaluation.encoders import build_encoder
    from inference.release import read_selected
    from stages.hw3_1 import load_config

    def load(fn, arg, what=None):
        try:
            return fn(arg)
        except Exception as e:   # not BaseException: Ctrl-C still stops it
            message = " ".join(str(e).split())   # one line
            if not isinstance(e, InputError):   # ours name the file and the problem already
                message = f"{type(e).__name__}: {message}"
            raise PrefetchError(f"{what}: {message}" if what else message) from e

    _, encoder_config = load(read_selected, release)   # these errors name the file themselves
    clip_name = load(lambda p: load_config(p).clip, params)
    what = f"hw3_2 image encoder: {encoder_config.kind} {encoder_config.name}"
    encoder = load(build_encoder, encoder_config, what)
    load(load_clip, clip_name, f"hw3_1 zero-shot CLIP {clip_name}")
    return [f"{what} ({encoder.num_tokens} tokens x {encoder.width})",
            f"hw3_1 zero-shot CLIP: {clip_name}"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", default=str(ROOT / "release"))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args(argv)

    try:
        for line in prefetch(args.release, args.params):
            print(f"ready: {line}")
    except PrefetchError as e:
        print(f"hw3_prefetch: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
