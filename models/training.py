"""Training a captioner on cached image tokens: AdamW, warm-up + cosine, gradient clipping,
autocast on GPU; every epoch a train loss, a val loss and a val CIDEr from greedy decoding of a
val subset; the checkpoint with the best val CIDEr is kept (CIDEr peaks early while the loss
keeps falling)."""
import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from models.checkpoint import save_trainable
from models.decoding import DecodeConfig, caption_features
from models.scoring import cider, tokenize_pair
from models.tokenizer import caption_batch


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    max_caption_tokens: int = 48  # inputs per caption, start and end token included
    val_images: int = 200  # val subset decoded every epoch for CIDEr (0 = all)
    val_batch_size: int = 64
    seed: int = 0


class CaptionPairs:
    """Every (image, caption) pair of a split, tokenised once; image tokens held in memory."""

    def __init__(self, features, references, tokenizer):
        """features: (names, tokens [N, T, D]); references: {name: [caption, ...]}."""
        names, self.tokens = features
        index = {n: i for i, n in enumerate(names)}
        missing = [n for n in references if n not in index]
        if missing:
            raise ValueError(f"{len(missing)} captioned image(s) have no cached features, "
                             f"e.g. {missing[:3]}: re-run the extract stage")
        self.names = list(names)
        self.references = references
        captions = [(index[n], c) for n, caps in references.items() for c in caps]
        ids = tokenizer.encode_batch([c for _, c in captions])
        self.pairs = [(i, t) for (i, _), t in zip(captions, ids)]

    def batches(self, batch_size, shuffle, generator=None):
        order = list(range(len(self.pairs)))
        if shuffle:
            generator.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [self.pairs[j] for j in order[start:start + batch_size]]


def lr_at(step, total, config):
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def gather_rows(tokens, rows):
    """`tokens[rows]`. A CPU tensor goes through numpy's take: torch's CPU index kernel on fp16
    rows of 257 x 1024 ran ~36x slower (bench/loader.py, docs/performance.md)."""
    if isinstance(tokens, torch.Tensor) and tokens.device.type == "cpu":
        return torch.from_numpy(tokens.numpy()[rows.numpy()])
    return tokens[rows]


def batch_loss(model, pairs, tokens, tokenizer, config, device):
    image_rows = torch.tensor([i for i, _ in pairs])
    visual = gather_rows(tokens, image_rows).to(device, non_blocking=True)
    input_ids, targets, _ = caption_batch([t for _, t in pairs], tokenizer.eot_id,
                                          config.max_caption_tokens)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model.loss(visual.float(), input_ids.to(device), targets.to(device))


def make_optimizer(model, config, fused=None):
    """AdamW over the trainable parameters (no weight decay on vectors); returns (optimizer, params).

    fused=None: torch's fused kernel when every parameter is on the GPU (same update, a few
    kernel launches instead of hundreds per step; training a small trainable part is
    launch-bound, docs/performance.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
                                  fused=fused or None)
    return optimizer, params


def train_step(model, optimizer, params, batch, tokens, tokenizer, config, device, lr):
    """One optimiser step on a batch of (image row, caption ids) pairs; returns the loss tensor.
    `tokens[rows]` gives the batch's image tokens (bench/train.py passes other sources)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = batch_loss(model, batch, tokens, tokenizer, config, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    return loss


@torch.no_grad()
def evaluate(model, val, tokenizer, config, device, subset):
    """(val loss over the subset's captions, greedy CIDEr over the subset, its captions)."""
    model.eval()
    sub_refs = {n: val.references[n] for n in subset}
    pairs = CaptionPairs((val.names, val.tokens), sub_refs, tokenizer)
    losses, weights = [], []
    for batch in pairs.batches(config.val_batch_size, shuffle=False):
        losses.append(batch_loss(model, batch, val.tokens, tokenizer, config, device).item())
        weights.append(len(batch))
    row_of = {n: i for i, n in enumerate(val.names)}
    rows = ((n, val.tokens[row_of[n]].float()) for n in subset)
    predictions = caption_features(model, tokenizer, rows, DecodeConfig(method="greedy"),
                                   batch_size=config.val_batch_size, device=device,
                                   total=len(subset))
    score, _ = cider(*tokenize_pair(predictions, sub_refs, subset))
    model.train()
    loss = sum(l * w for l, w in zip(losses, weights)) / sum(weights)
    return loss, score, predictions


def train(model, train_pairs, val_pairs, tokenizer, config, checkpoint_path, device,
          log=print):
    """Train the trainable part of `model`; write the best-val-CIDEr checkpoint; return history."""
    torch.manual_seed(config.seed)
    shuffler = random.Random(config.seed)
    model.to(device).train()
    optimizer, params = make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_pairs.pairs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    subset = sorted(val_pairs.references)
    if config.val_images:
        subset = subset[:config.val_images]
    history, best, step, start = [], None, 0, time.time()
    for epoch in range(1, config.epochs + 1):
        running, count = 0.0, 0
        bar = tqdm(train_pairs.batches(config.batch_size, True, shuffler), total=steps_per_epoch,
                   desc=f"epoch {epoch}/{config.epochs}", leave=False)
        for batch in bar:
            loss = train_step(model, optimizer, params, batch, train_pairs.tokens, tokenizer,
                              config, device, lr_at(step, total, config))
            step += 1
            running += loss.item() * len(batch)
            count += len(batch)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val_loss, val_cider, _ = evaluate(model, val_pairs, tokenizer, config, device, subset)
        row = dict(epoch=epoch, train_loss=running / count, val_loss=val_loss, val_cider=val_cider,
                   seconds=round(time.time() - start, 1))
        history.append(row)
        log(f"epoch {epoch}: train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
            f"val CIDEr {val_cider:.4f}")
        if best is None or val_cider > best["val_cider"]:
            best = row
            save_trainable(model, checkpoint_path, extra={"epoch": epoch, "val_cider": val_cider})
    return history, best
