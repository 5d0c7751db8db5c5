"""DVC stage demo_gpt2: pretrain the demo world's small GPT-2 on the demo training captions.

    python -m stages.demo_gpt2 [--p2-data data/demo/hw3_data/p2_data] [--text-dir DIR]
                               [--metrics metrics/demo_gpt2.json] [--plots plots/demo_gpt2]

Captions come from --p2-data; encoder.json + vocab.bpe are read from, and decoder_model.bin is
written into, --text-dir (default: the --p2-data folder, as in the course's layout).

Reads params.yaml's `demo_gpt2` section (demo.lm_pretrain.LMConfig) and the vocabulary written by
demo_vocab; writes p2_data/decoder_model.bin in the course format, the validation perplexity of the
trained model next to the untrained one's, and the loss curves.
"""
import argparse
from pathlib import Path

import torch

from demo.lm_pretrain import pretrain, save_decoder, write_curves
from demo.vocab import read_captions
from common.atomic import write_json
from common.errors import run_stage
from common.params import from_section, load_params
from demo.lm_pretrain import LMConfig
from captioning.tokenizer import Tokenizer, caption_batch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p2-data", default="data/demo/hw3_data/p2_data")
    ap.add_argument("--text-dir", default=None,
                    help="folder of encoder.json + vocab.bpe, and of the decoder_model.bin written (default: --p2-data)")
    ap.add_argument("--metrics", default="metrics/demo_gpt2.json")
    ap.add_argument("--plots", default="plots/demo_gpt2")
    ap.add_argument("--log", default="logs/demo_gpt2.json", help="wall-clock seconds")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    cfg = from_section(LMConfig, load_params(args.params).get("demo_gpt2"),
                       f"{args.params}: demo_gpt2")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    p2 = Path(args.p2_data)
    text_dir = Path(args.text_dir) if args.text_dir else p2
    tok = Tokenizer.from_files(text_dir / "encoder.json", text_dir / "vocab.bpe")
    train, val = read_captions(p2 / "train.json"), read_captions(p2 / "val.json")
    model, metrics, train_curve, val_curve = pretrain(tok, train, val, cfg)
    check_ids, _, _ = caption_batch(tok.encode_batch(val[:64]), tok.eot_id, cfg.block_size)
    save_decoder(model, text_dir / "decoder_model.bin", check_ids)
    seconds = metrics.pop("train_seconds")   # apart from the metrics: re-runs do not change them
    write_json(args.log, {"train_seconds": seconds})
    write_json(args.metrics, metrics)
    write_curves(train_curve, val_curve, args.plots)
    print(f"demo GPT-2: val perplexity {metrics['val_perplexity']:.3f} trained vs "
          f"{metrics['val_perplexity_untrained']:.1f} untrained, {seconds:.0f} s")


if __name__ == "__main__":
    run_stage(main)
