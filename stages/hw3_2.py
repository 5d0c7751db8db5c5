"""hw3_2.sh: caption every image of a folder -> JSON {name without extension: caption}.

    bash hw3_2.sh IMG_DIR OUT_JSON DECODER_BIN

Uses what the pipeline released (release/: the selected variant's trainable checkpoint, its
tokenizer files, the image encoder and decoding settings) and the frozen GPT-2 at DECODER_BIN.

Exit status: 0 every image captioned; 3 some image files were unreadable or have a name that is
not valid UTF-8 (which no JSON key can hold; one stderr line each), the JSON holds all the
others; 1 fatal (missing or empty folder, no readable image, two images of one name such as a.jpg
and a.png, an output path that cannot be written, is a device, or is an input: an image, the
decoder, a released file, the image encoder's weights or their download cache; a decoder or
checkpoint that does not fit): nothing written; 2 usage error; 130 interrupted (Ctrl-C): nothing
written.
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
    from common.imageio import (ImageFolderError, image_names, list_images, names_not_utf8,
                                printable, report_skip)
    from inference.model_files import encoder_files
    from inference.release import load_release, read_selected

    out_json, release = Path(out_json), Path(release)
    paths = list_images(img_dir, stream=sys.stderr)   # no folder, no images: fail before loading
    # a name that is not UTF-8 cannot be a JSON key: that image is left out, the others written
    paths, unnamed = names_not_utf8(paths)
    image_names(paths)   # two images of one name (a.jpg, a.png): fatal, before the long work
    _, encoder_config = read_selected(release)
    # everything the run reads: the output must name none of it, the encoder's weights included
    inputs = [decoder_bin, *paths, *release.glob("*"), *encoder_files(encoder_config)]
    check_writable(out_json, inputs=inputs)
    for err in unnamed:
        report_skip(err)
    if not paths:
        raise ImageFolderError(f"{printable(img_dir)}: none of its {len(unnamed)} image files has "
                               "a name a JSON key can hold (valid UTF-8)")
    device = resolve_device(device, "--device")
    if workers is None:   # decoding JPEGs in parallel pays when a GPU does the rest
        workers = min(8, os.cpu_count() or 1) if device.startswith("cuda") else 0
    r = load_release(release, decoder_bin, device)
    decode = r.decode_config({"batch_size": batch_size} if batch_size else None,
                             f"{release / 'selected.json'}: decode")
    captions, skipped = caption_folder(paths, r.encoder, r.model, r.tokenizer, decode,
                                       num_workers=workers, device=device)
    skipped = unnamed + skipped
    if not captions:
        raise ImageFolderError(f"{printable(img_dir)}: none of its {len(skipped)} image files could "
                               "be read")
    write_json(out_json, captions)
    print(f"hw3_2: {len(captions)} images captioned -> {printable(out_json)}"
          + (f"; {len(skipped)} files skipped (a line each above)" if skipped else ""),
          file=sys.stderr)
    return EXIT_SKIPPED if skipped else EXIT_OK


def parse_and_run(argv=None):
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
    from common.imageio import one_line
    try:
        return run(args.img_dir, args.out_json, args.decoder_bin, Path(args.release),
                   args.batch_size, args.device, args.workers)
    except (InputError, ValueError, OSError) as e:
        print(f"hw3_2: error: {one_line(e)}", file=sys.stderr)
        return EXIT_FATAL


def main(argv=None):
    from common.errors import interruptible
    return interruptible("hw3_2", parse_and_run, argv)


if __name__ == "__main__":
    sys.exit(main())
