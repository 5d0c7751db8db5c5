"""Pretrain the demo world's small GPT-2 on the demo training captions and save it in the course's
`decoder_model.bin` format (captioning.gpt2.course_state_dict), so the frozen decoder of every later
stage is read by the same loader in the demo world and the real one.

Each caption is one sequence in the course's layout (captioning.tokenizer.caption_batch):
inputs `[eot, t1..tN, eot, pad...]`, targets `[t1..tN, eot, -100...]`. Perplexity is
exp(mean cross-entropy over the counted targets), i.e. per token including the final eot.
"""
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import ParamsError
from common.atomic import atomic_open, atomic_path
from captioning.gpt2 import GPT2, GPT2Config, course_state_dict, load_course_checkpoint
from captioning.tokenizer import IGNORE_INDEX, caption_batch, length_parts


@dataclass
class LMConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64        # longest caption + 2; demo captions are <= ~30 tokens
    epochs: int = 2             # the validation loss is nearly flat after the first epoch
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_frac: float = 0.1    # cosine decays to lr * min_lr_frac
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0             # torch CPU threads; 0 = torch's default
    log_every: int = 10         # steps per point of the training-loss curve
    length_parts: int = 1       # each batch as sub-batches of similar length (train.speed.length_parts)

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "epochs", "batch_size", "log_every",
                     "length_parts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be at least 0 (0: torch's default)")
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be at least 2")

    def model_config(self, vocab_size):
        return GPT2Config(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                          n_head=self.n_head, n_embd=self.n_embd)


def lr_at(step, total_steps, cfg):
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_frac at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(progress, 1.0)
    min_lr = cfg.lr * cfg.min_lr_frac
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def lm_loss(model, token_lists, eot_id, max_len, parts=1):
    """Mean cross-entropy over the counted targets of one batch, and how many targets counted.
    parts > 1: the same from that many sub-batches of similar length, each padded to its own
    longest caption (captioning.tokenizer.length_parts)."""
    if parts > 1 and len(token_lists) > 1:
        losses = [lm_loss(model, [token_lists[i] for i in part], eot_id, max_len)
                  for part in length_parts(token_lists, parts)]
        count = sum(n for _, n in losses)
        return sum(loss * (n / count) for loss, n in losses), count
    inputs, targets, _ = caption_batch(token_lists, eot_id, max_len)
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def perplexity(model, token_lists, eot_id, max_len, batch_size=256):
    """exp(mean per-token cross-entropy) of `model` on the captions (course layout, eot included)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(token_lists), batch_size):
        loss, n = lm_loss(model, token_lists[i:i + batch_size], eot_id, max_len)
        total += loss.item() * n
        count += n
    model.train(was_training)
    return math.exp(total / count)


def make_optimizer(model, cfg):
    """AdamW; weight decay on matrices and embeddings only (nanoGPT's split), not biases/LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def train_lm(model, train_tokens, eot_id, cfg, val_tokens=None, progress=True):
    """Train `model` in place on tokenised captions; returns (train_curve, val_curve).

    train_curve: [{"step", "epoch", "loss", "lr"}] averaged over each log_every steps;
    val_curve: [{"step", "epoch", "val_loss"}] before training and after every epoch (when
    val_tokens is given).
    """
    if not train_tokens:
        raise ValueError("train_lm needs at least one training caption")
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(train_tokens) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    opt = make_optimizer(model, cfg)
    model.train()
    train_curve, val_curve = [], []
    step, acc_loss, acc_n = 0, 0.0, 0
    if val_tokens:  # the untrained model, as the curve's first point
        val_curve.append({"step": 0, "epoch": 0, "val_loss": round(
            math.log(perplexity(model, val_tokens, eot_id, cfg.block_size)), 5)})
    bar = tqdm(total=total_steps, desc="pretrain demo gpt2", disable=not progress)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train_tokens), generator=gen).tolist()
        for b in range(steps_per_epoch):
            batch = [train_tokens[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
            lr = lr_at(step, total_steps, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, _ = lm_loss(model, batch, eot_id, cfg.block_size, cfg.length_parts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            acc_loss, acc_n = acc_loss + loss.item(), acc_n + 1
            if step % cfg.log_every == 0 or step == total_steps:
                train_curve.append({"step": step, "epoch": round(step / steps_per_epoch, 4),
                                    "loss": round(acc_loss / acc_n, 5), "lr": lr})
                bar.set_postfix(loss=f"{acc_loss / acc_n:.3f}", lr=f"{lr:.2e}")
                acc_loss, acc_n = 0.0, 0
            bar.update(1)
        if val_tokens:
            val_loss = math.log(perplexity(model, val_tokens, eot_id, cfg.block_size))
            val_curve.append({"step": step, "epoch": epoch + 1, "val_loss": round(val_loss, 5)})
            bar.write(f"epoch {epoch + 1}: val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.3f})")
    bar.close()
    return train_curve, val_curve


def pretrain(tok, train_captions, val_captions, cfg, progress=True):
    """Build a GPT-2 (seeded), measure it untrained, train it, measure it again.

    Returns (model, metrics, train_curve, val_curve); metrics holds both validation perplexities.
    """
    torch.manual_seed(cfg.seed)
    model = GPT2(cfg.model_config(tok.vocab_size))
    train_tokens = tok.encode_batch(train_captions)
    val_tokens = tok.encode_batch(val_captions)
    if not train_tokens or not val_tokens:
        raise ValueError("pretraining needs training and validation captions")
    longest = max(len(t) for t in train_tokens + val_tokens) + 2
    if longest > cfg.block_size:
        # caption_batch would silently truncate; for pretraining, say so instead
        raise ParamsError(f"demo_gpt2.block_size={cfg.block_size} is shorter than the longest "
                         f"caption plus start/end tokens ({longest})")
    t0 = time.perf_counter()
    train_curve, val_curve = train_lm(model, train_tokens, tok.eot_id, cfg, val_tokens, progress)
    seconds = time.perf_counter() - t0  # includes the validation passes
    metrics = {
        "val_perplexity": round(math.exp(val_curve[-1]["val_loss"]), 4),
        "val_perplexity_untrained": round(math.exp(val_curve[0]["val_loss"]), 4),
        "train_loss_last": train_curve[-1]["loss"],
        "train_seconds": round(seconds, 1),
        "steps": train_curve[-1]["step"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": tok.vocab_size,
        "train_captions": len(train_tokens),
        "val_captions": len(val_tokens),
    }
    return model, metrics, train_curve, val_curve


def save_decoder(model, path, check_ids):
    """Save in the course decoder_model.bin format, then reload it through the course loader and
    check that it gives the same logits on `check_ids` (a LongTensor [B, T] of token ids)."""
    with atomic_open(path, "wb") as f:   # a file object: torch names the archive "archive",
        torch.save(course_state_dict(model), f)   # not after the (per-run) temporary file
    reloaded = load_course_checkpoint(path, n_head=model.config.n_head)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        if not torch.equal(model(check_ids), reloaded(check_ids)):
            raise RuntimeError(f"{path}: the reloaded decoder does not reproduce the trained one")
    return reloaded


def write_curves(train_curve, val_curve, folder):
    """train_loss.csv and val_loss.csv (for `dvc plots`) and loss.png (for a person)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    for name, rows in (("train_loss.csv", train_curve), ("val_loss.csv", val_curve)):
        if rows:
            with atomic_open(folder / name, "w", encoding="utf-8", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train_curve], [r["loss"] for r in train_curve], label="train (running mean)")
    if val_curve:
        ax.plot([r["step"] for r in val_curve], [r["val_loss"] for r in val_curve], "o-",
                label="val (untrained, then end of each epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per token (nats)")
    ax.set_yscale("log")
    ax.set_title("demo GPT-2 pretraining on demo captions")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(folder / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
