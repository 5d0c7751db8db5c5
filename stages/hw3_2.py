"""hw3_2.sh: caption every image of a folder -> JSON {name without extension: caption}.

    bash hw3_2.sh IMG_DIR OUT_JSON DECODER_BIN

Uses what the pipeline released (release/: the selected variant's trainable checkpoint, its
tokenizer files, the image encoder and decoding settings) and the frozen GPT-2 at DECODER_BIN.

Exit status: 0 every image captioned; 3 some image files were unreadable (one stderr line each),
the JSON holds all the others; 1 fatal (missing or empty folder, no readable image, an output path
that cannot be written or that is an input, a decoder or checkpoint that does not fit): nothing
written; 2 usage error.
"""
import argparse
import os
import sys
from pathlib import Path

from common.params import int_at_least

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3
ROOT = Path(__file__).resolve().parent.parent


def run(img_dir, out_json, decoder_bin, release, batch_size=None, device=None, workers=None):
    from common.atomic import check_writable, write_json
    from inference.caption_folder import caption_folder
    from common.device import resolve_device
    from common.imageio import ImageFolderError, list_images
    from inference.release import load_release

    out_json = Path(out_json)
    paths = list_images(img_dir, stream=sys.stderr)   # no folder, no images: fail before loading
    check_writable(out_json, inputs=[decoder_bin, *paths, *Path(release).glob("*")])
    device = resolve_device(device, "--device")
    if workers is None:   # decoding JPEGs in parallel pays when a GPU does the rest
        workers = min(8, os.cpu_count() or 1) if device.startswith("cuda") else 0
    r = load_release(release, decoder_bin, device)
    decode = r.decode_config({"batch_size": batch_size} if batch_size else None,
                             f"{release / 'selected.json'}: decode")
    captions, skipped = caption_folder(paths, r.encoder, r.model, r.tokenizer, decode,
                                       num_workers=workers, device=device)
    if not captions:
        raise ImageFolderError(f"{img_dir}: none of its {len(skipped)} image files could be read")
    write_json(out_json, captions)
    print(f"hw3_2: {len(captions)} images captioned -> {out_json}"
          + (f"; {len(skipped)} unreadable files skipped" if skipped else ""), file=sys.stderr)
    return EXIT_SKIPPED if skipped else EXIT_OK


def main(argv=None):
    ap = argparse.ArgumentParser(prog="hw3_2.sh", description=__doc__.split("\n")[0])
    ap.add_argument("img_dir")
    ap.add_argument("out_json")
    ap.add_argument("decoder_bin")
    ap.add_argument("--release", default=str(ROOT / "release"),
                    help="what `dvc repro select` wrote (default: release/ in the repository)")
    ap.add_argument("--batch-size", type=int_at_least(1))
    ap.add_argument("--device")
    ap.add_argument("--workers", type=int_at_least(0),
                    help="image decoding processes (default: up to 8 on a GPU, none on the CPU)")
    args = ap.parse_args(argv)

    from common.errors import InputError
    try:
        return run(args.img_dir, args.out_json, args.decoder_bin, Path(args.release),
                   args.batch_size, args.device, args.workers)
    except (InputError, ValueError, OSError) as e:
        print(f"hw3_2: error: {e}", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
