"""hw3_1.sh: classify every image of a folder with CLIP zero-shot -> CSV `filename,label`.

    python -m stages.hw3_1 IMG_DIR ID2LABEL_JSON OUT_CSV [--params params.yaml] [--clip NAME_OR_PATH]

Which CLIP and which prompts come from params.yaml's `zeroshot` section (clip, predict_with,
ensemble/templates), the same as the zeroshot stage's predictions/p1.csv.

Exit status: 0 every image classified (a file name that is not valid UTF-8 is written with its
original bytes); 3 some image files were unreadable (one stderr line each), the CSV holds all the
others; 1 fatal (missing or empty folder, no readable image, an output path that cannot be
written, is a device, or is an input: an image, id2label.json, params.yaml, the CLIP file or
clip.load's cache file of a CLIP name; bad id2label.json, bad params or checkpoint): nothing
written; 2 usage error; 130 interrupted (Ctrl-C): nothing written.
"""
import argparse
import sys
from pathlib import Path

from common.params import int_at_least, load_params
from common.errors import InputError, ParamsError, interruptible

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3
ROOT = Path(__file__).resolve().parent.parent


def load_config(params_path, clip_override=None):
    from evaluation.zeroshot import ZeroShotConfig
    params_path = Path(params_path)
    params = load_params(params_path)
    if "zeroshot" not in params:
        raise ParamsError(f"{params_path}: no zeroshot section")
    cfg = ZeroShotConfig.from_params(params["zeroshot"], source=str(params_path))
    if clip_override:
        cfg.clip = clip_override
    else:
        # relative checkpoint paths in params.yaml are relative to the repo (the params' folder)
        candidate = params_path.resolve().parent / cfg.clip
        if not Path(cfg.clip).is_absolute() and candidate.exists():
            cfg.clip = str(candidate)
    return cfg


def run(img_dir, id2label_path, out_csv, cfg, batch_size=None, num_workers=None, params_path=None):
    """Returns the exit status; raises on fatal errors before anything is written."""
    from common.atomic import check_writable
    from evaluation.clip_io import load_clip
    from common.imageio import ImageFolderError, list_images
    from evaluation.zeroshot import classify, embed_images, read_id2label, write_predictions_csv
    from inference.model_files import clip_files

    out_csv = Path(out_csv)
    id2label = read_id2label(id2label_path)
    paths = list_images(img_dir, stream=sys.stderr)
    # everything the run reads: the output must name none of it, the CLIP's cache file included
    check_writable(out_csv, inputs=[id2label_path, params_path, *clip_files(cfg.clip), *paths])
    device = cfg.torch_device()
    model, preprocess = load_clip(cfg.clip, device=device)
    emb = embed_images(model, preprocess, paths, batch_size=batch_size or cfg.batch_size,
                       num_workers=cfg.num_workers if num_workers is None else num_workers)
    if not emb.paths:
        raise ImageFolderError(f"{img_dir}: none of its {len(emb.skipped)} image files could be read")
    pred, _ = classify(model, emb, id2label, cfg.prediction_templates())
    write_predictions_csv(out_csv, [p.name for p in emb.paths], pred)
    print(f"hw3_1: {len(emb.paths)} images classified -> {out_csv}"
          + (f"; {len(emb.skipped)} unreadable files skipped" if emb.skipped else ""),
          file=sys.stderr)
    return EXIT_SKIPPED if emb.skipped else EXIT_OK


def parse_and_run(argv=None):
    ap = argparse.ArgumentParser(prog="hw3_1.sh", description=__doc__.split("\n")[0])
    ap.add_argument("img_dir")
    ap.add_argument("id2label")
    ap.add_argument("out_csv")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--clip", help="override zeroshot.clip (a checkpoint path or a CLIP name)")
    ap.add_argument("--device", help="override zeroshot.device (cpu, cuda, auto)")
    ap.add_argument("--batch-size", type=int_at_least(1))
    ap.add_argument("--num-workers", type=int_at_least(0))
    args = ap.parse_args(argv)   # exits with 2 on a usage error

    from common.device import resolve_device
    from common.imageio import one_line
    try:
        cfg = load_config(args.params, args.clip)
        if args.device:
            cfg.device = resolve_device(args.device, "--device")
        return run(args.img_dir, args.id2label, args.out_csv, cfg, args.batch_size,
                   args.num_workers, args.params)
    except (InputError, ValueError, OSError) as e:
        print(f"hw3_1: error: {one_line(e)}", file=sys.stderr)
        return EXIT_FATAL


def main(argv=None):
    return interruptible("hw3_1", parse_and_run, argv)


if __name__ == "__main__":
    sys.exit(main())
