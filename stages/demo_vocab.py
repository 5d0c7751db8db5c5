"""DVC stage demo_vocab: byte-level BPE on the demo training captions -> encoder.json + vocab.bpe.

    python -m stages.demo_vocab [--p2-data data/demo/hw3_data/p2_data] [--out-dir DIR]
                                [--metrics metrics/demo_vocab.json]

Reads train.json / val.json from --p2-data and writes encoder.json + vocab.bpe into --out-dir
(default: the --p2-data folder, as in the course's layout).

Reads params.yaml's `demo_vocab` section (vocab_size, min_frequency).
"""
import argparse

from common.atomic import write_json
from common.errors import run_stage
from demo.vocab import build_demo_vocab
from common.params import from_section, load_params
from demo.vocab import VocabConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p2-data", default="data/demo/hw3_data/p2_data")
    ap.add_argument("--out-dir", default=None, help="where encoder.json + vocab.bpe go (default: --p2-data)")
    ap.add_argument("--metrics", default="metrics/demo_vocab.json")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    cfg = from_section(VocabConfig, load_params(args.params).get("demo_vocab"),
                       f"{args.params}: demo_vocab")
    stats = build_demo_vocab(args.p2_data, cfg, args.out_dir)
    write_json(args.metrics, stats)
    print(f"demo vocabulary: {stats['vocab_size']} tokens ({stats['merges']} merges), "
          f"{stats['train_tokens_per_caption_mean']} tokens per training caption")


if __name__ == "__main__":
    run_stage(main)
