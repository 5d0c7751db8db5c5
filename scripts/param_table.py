"""Trainable and frozen parameters of every default variant at the course's real size.

GPT-2 small (12 x 768, vocab 50257, block 1024) reading ViT-L/14 tokens (257 x 1024), each bridge
on the image tokens and on QUERIES learned queries x each PEFT method, the other settings their
BridgeConfig / PeftConfig defaults. The models are built on the meta
device: shapes only, no weights read, nothing allocated. The course allows < 35M trainable.

    python -m scripts.param_table            # Markdown table on stdout
"""
import argparse
import itertools

from captioning.bridges import BRIDGES, BridgeConfig
from captioning.captioner import PRETRAINED, CaptionerConfig, build_on_meta
from captioning.gpt2 import GPT2Config
from captioning.peft import METHODS, PeftConfig

LIMIT = 35_000_000
GPT2_SMALL = GPT2Config(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
VIT_L14_TOKENS = dict(visual_width=1024, visual_tokens=257)  # class token + 16 x 16 patches
QUERIES = 32  # the queries of the 2 x 2 ablation (scripts/sweep.py `queries`)


def real_size_config(bridge, method, queries=0):
    return CaptionerConfig(decoder=GPT2_SMALL, bridge=BridgeConfig.of(bridge, queries=queries),
                           peft=PeftConfig.of(method), **VIT_L14_TOKENS)


def parameter_table():
    """One row per bridge (image tokens, queries) x method: trainable / frozen counts and the
    trainable split by part."""
    rows = []
    for bridge, queries, method in itertools.product(BRIDGES, (0, QUERIES), METHODS):
        counts = build_on_meta(real_size_config(bridge, method, queries)).parameter_counts()
        rows.append(dict(bridge=bridge, queries=queries, method=method,
                         trainable=sum(t for t, _ in counts.values()),
                         frozen=sum(f for _, f in counts.values()),
                         parts={part: t for part, (t, _) in counts.items() if t and part != PRETRAINED}))
    return rows


def markdown(rows):
    lines = ["| bridge | queries | PEFT | trainable | frozen | trainable / total | trainable by part "
             "| < 35M |", "|---|---:|---|---:|---:|---:|---|:-:|"]
    for r in rows:
        parts = ", ".join(f"{p} {n:,}" for p, n in sorted(r["parts"].items()))
        share = r["trainable"] / (r["trainable"] + r["frozen"])
        lines.append(f"| {r['bridge']} | {r['queries'] or 'no'} | {r['method']} | {r['trainable']:,} | {r['frozen']:,} | "
                     f"{share:.1%} | {parts} | {'yes' if r['trainable'] < LIMIT else '**NO**'} |")
    return "\n".join(lines)


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(markdown(parameter_table()))


if __name__ == "__main__":
    main()
