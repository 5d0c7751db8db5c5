"""hw3_2.sh: caption every image of a folder -> JSON {name without extension: caption}.

    bash hw3_2.sh IMG_DIR OUT_JSON DECODER_BIN

Uses what the pipeline released (release/: the selected variant's trainable checkpoint, its
tokenizer files, the image encoder and decoding settings) and the frozen GPT-2 at DECODER_BIN.

Exit status: 0 every image captioned; 3 some image files were unreadable (one stderr line each),
the JSON holds all the others; 1 fatal (missing or empty folder, a decoder or checkpoint that does
not fit): nothing written; 2 usage error.
"""
import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3
ROOT = Path(__file__).resolve().parent.parent


def run(img_dir, out_json, decoder_bin, release, batch_size=None, device=None):
    import torch

    from models.atomic import write_json
    from models.caption_folder import caption_folder
    from models.checkpoint import load_captioner
    from models.decoding import DecodeConfig
    from models.encoders import build_encoder, encoder_id, EncoderConfig
    from models.tokenizer import Tokenizer

    out_json = Path(out_json)
    if out_json.is_dir():
        raise ValueError(f"{out_json}: output path is a folder, expected a JSON file path")
    selected_path = release / "selected.json"
    try:
        selected = json.loads(selected_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{selected_path}: missing: run `dvc repro select` (or `dvc pull select`)") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    decode = dict(selected["decode"])
    default_batch = decode.pop("batch_size", 32)
    model, _ = load_captioner(release / "captioner.safetensors", decoder_bin, device)
    tokenizer = Tokenizer.from_files(release / "encoder.json", release / "vocab.bpe")
    if tokenizer.identity != model.config.tokenizer_id:
        raise ValueError(f"{release}: encoder.json/vocab.bpe are not the checkpoint's vocabulary")
    encoder_config = EncoderConfig.from_dict(selected["encoder"])
    if not Path(encoder_config.name).is_absolute() and (ROOT / encoder_config.name).exists():
        encoder_config.name = str(ROOT / encoder_config.name)  # a demo CLIP file in the repo
    if encoder_id(encoder_config) != model.config.encoder_id:
        raise ValueError(f"image encoder {encoder_config.name}: not the one the checkpoint was "
                         f"trained on ({model.config.encoder_id})")
    encoder = build_encoder(encoder_config, device)
    captions, skipped = caption_folder(img_dir, encoder, model, tokenizer, DecodeConfig.from_dict(decode, f"{selected_path} decode"),
                                       batch_size or default_batch, device=device)
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
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--device")
    args = ap.parse_args(argv)

    from models.caption_folder import DuplicateNameError
    from models.encoders import EncoderError
    from models.gpt2 import CheckpointError
    from models.imageio import ImageFolderError
    try:
        return run(args.img_dir, args.out_json, args.decoder_bin, Path(args.release),
                   args.batch_size, args.device)
    except (ImageFolderError, CheckpointError, EncoderError, DuplicateNameError, ValueError,
            OSError) as e:
        print(f"hw3_2: error: {e}", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
