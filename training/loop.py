"""Training a captioner on cached image tokens: AdamW, warm-up + cosine, gradient clipping,
bf16 autocast on GPU; every epoch a train loss, a val loss and a val CIDEr from greedy decoding of a
val subset; the checkpoint with the best val CIDEr is kept (CIDEr peaks early while the loss
keeps falling). The speed tricks around a step are speed/'s, each behind a switch of
`train.speed`.

Under torchrun (`ranks`, common/distributed.py) the same optimisation runs as several processes:
every rank draws the same global batches (train.batch_size captions, whatever the number of
processes), takes its contiguous share of each, and weights its share's mean token loss by the
share's fraction of the batch's target tokens; DistributedDataParallel sums the gradients, so
every rank applies the gradient of the whole batch's mean token loss, as one process does (equal
up to the order of fp32 additions). Only rank 0 evaluates and writes the checkpoint."""
import itertools
import math
import random
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from captioning.checkpoint import save_trainable
from captioning.decoding import DecodeConfig, caption_features
from captioning.tokenizer import caption_batch, length_parts, target_count
from common.precision import DTYPES, autocast
from evaluation.scoring import cider, tokenize_pair
from speed import SpeedConfig, TrainingSpeedups

LOG_EVERY = 20  # steps between two reads of the running loss (each read waits for the GPU)


class TrainingLog:
    """What train() reports: every LOG_EVERY steps the mean train loss of those steps and the
    learning rate (`step`); every epoch its row (`epoch`; with a gated bridge, "gates": {decoder
    block: tanh(gate)}). This one prints the epochs; the train
    stage's also logs both with dvclive."""

    def step(self, step, values):
        pass

    def epoch(self, row):
        print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}  val loss "
              f"{row['val_loss']:.4f}  val CIDEr {row['val_cider']:.4f}")


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    max_caption_tokens: int = 48  # inputs per caption, start and end token included
    val_images: int = 200  # val subset decoded every epoch for CIDEr (0 = all)
    val_batch_size: int = 64
    seed: int = 0
    precision: str = "auto"  # "auto": bf16 autocast on a GPU, fp32 on the CPU | "fp32" | "bf16"
    # Batches take an image's captions together (the images in random order), so that its
    # cross-attention keys/values are computed once for all of them; but a batch then holds 5x
    # fewer images (docs/performance.md). False: the captions in random order.
    group_by_image: bool = False
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    # Processes on this machine (train stage): above 1, the stage re-runs itself under `torchrun
    # --standalone --nproc-per-node N` (one per GPU, or per CPU core): the same optimisation
    nproc_per_node: int = 1
    # The first N epochs step the bridge alone (the PEFT parameters stay as initialised), then
    # bridge and PEFT together: LLaVA's two stages (feature alignment, then tuning). 0 = one stage
    bridge_only_epochs: int = 0

    def __post_init__(self):
        for name, least in (("epochs", 1), ("batch_size", 1), ("val_batch_size", 1),
                            ("nproc_per_node", 1),
                            ("max_caption_tokens", 2),  # 2: the start and the end token
                            ("val_images", 0), ("grad_clip", 0), ("lr", 0), ("warmup_steps", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: must be at least {least}")
        if not 0 <= self.bridge_only_epochs < self.epochs:
            raise ValueError(f"train.bridge_only_epochs={self.bridge_only_epochs}: must be at least "
                             f"0 and below train.epochs={self.epochs}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision={self.precision!r}: must be 'auto', 'fp32' or 'bf16'")

    def autocast_dtype(self, device):
        """The autocast dtype on `device`, or None for plain fp32. "auto" takes bf16 only on a GPU
        that computes it natively (Ampere or later); emulated bf16 is slower than fp32."""
        if self.precision == "auto":
            native = torch.device(device).type == "cuda" and \
                torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else None
        return DTYPES[self.precision]


class CaptionPairs:
    """Every (image, caption) pair of a split, tokenised once; image tokens held in memory."""

    def __init__(self, features, references, tokenizer):
        """features: (names, tokens [N, T, D]); references: {name: [caption, ...]}."""
        names, self.tokens = features
        index = {n: i for i, n in enumerate(names)}
        missing = [n for n in references if n not in index]
        if missing:
            raise ValueError(f"{len(missing)} captioned image(s) have no cached features, "
                             f"e.g. {missing[:3]}: re-run the extract stage; if "
                             "extract.skip_unreadable left them out, mend those images or remove "
                             "their captions")
        self.names = list(names)
        self.references = references
        captions = [(index[n], c) for n, caps in references.items() for c in caps]
        ids = tokenizer.encode_batch([c for _, c in captions])
        self.pairs = [(i, t) for (i, _), t in zip(captions, ids)]

    def batches(self, batch_size, shuffle, generator=None, by_image=False):
        """Every pair once, in batches of `batch_size`: in random order (shuffle, drawn from the
        random.Random `generator`) or as listed, an image's captions one after another. by_image:
        the captions of an image stay consecutive, so mostly in one batch, and the images are
        shuffled instead."""
        order = range(len(self.pairs))   # listed image by image (__init__)
        if by_image:
            groups = [list(g) for _, g in itertools.groupby(order, key=lambda j: self.pairs[j][0])]
        else:
            groups = [[j] for j in order]
        if shuffle:
            generator.shuffle(groups)
        order = [j for g in groups for j in g]
        for start in range(0, len(order), batch_size):
            yield [self.pairs[j] for j in order[start:start + batch_size]]


def lr_at(step, total, config):
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_loss(model, pairs, image_rows, tokenizer, config, device, loss=None, width_multiple=1,
               parts=1):
    """The loss of a batch of (image row, caption ids) pairs by `loss` (default: model.loss), the
    captions padded to a multiple of `width_multiple`; `image_rows(indices)` gives the image
    tokens of table rows `indices` on the device. Each image of the batch is read and projected
    once, however many of its captions the batch holds. parts > 1 (train.speed.length_parts):
    the same mean token loss from that many sub-batches of captions of similar length."""
    if parts > 1 and len(pairs) > 1:
        chunks = [[pairs[i] for i in part] for part in length_parts([t for _, t in pairs], parts)]
        counts = [target_count([t for _, t in chunk], config.max_caption_tokens) for chunk in chunks]
        return sum(batch_loss(model, chunk, image_rows, tokenizer, config, device, loss,
                              width_multiple) * (count / sum(counts))
                   for chunk, count in zip(chunks, counts))
    rows = [i for i, _ in pairs]
    images = list(dict.fromkeys(rows))   # in order of first appearance
    image_index = None   # every caption its own image: caption b reads image b
    if len(images) < len(rows):
        place = {row: k for k, row in enumerate(images)}
        image_index = torch.tensor([place[row] for row in rows]).to(device, non_blocking=True)
    visual = image_rows(torch.tensor(images))
    input_ids, targets, _ = caption_batch([t for _, t in pairs], tokenizer.eot_id,
                                          config.max_caption_tokens, width_multiple)
    with autocast(device.type, config.autocast_dtype(device)):
        return (loss or model.loss)(visual.float(), input_ids.to(device), targets.to(device),
                                    image_index)


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


def train_step(model, optimizer, params, batch, tokenizer, config, device, lr, fast, loss=None,
               weight=None, held=()):
    """One optimiser step on a batch of (image row, caption ids) pairs, inside `fast` (the run's
    TrainingSpeedups); returns the loss tensor. Under torchrun: `loss` the DistributedDataParallel
    loss (`data_parallel_loss`), `batch` this rank's share, its loss weighted by `weight` for the
    backward (the share's fraction of the global batch's target tokens). `held`: parameters this
    step leaves alone (their gradients dropped: AdamW skips them, weight decay included, and the
    clipping norm leaves them out)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Gradients dropped before the forward: their memory is free for it, and with CUDA graphs none
    # of last step's graph outputs is still held when the next replay reuses it.
    optimizer.zero_grad(set_to_none=True)
    fast.zero_grad()
    loss = batch_loss(model, batch, fast.rows, tokenizer, config, device,
                      fast.loss if loss is None else loss, fast.width_multiple, fast.length_parts)
    (loss if weight is None else loss * weight).backward()
    fast.grads_to_masters()
    for p in held:
        p.grad = None
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    fast.masters_to_copies()
    return loss


def speedups(model, tokens, config, device, store_trainable=True):
    """The TrainingSpeedups of a run of `config` on `device` (the model moved there first)."""
    model.to(device).train()
    return TrainingSpeedups(model, tokens, config.speed, config.autocast_dtype(device), device,
                            config.group_by_image, store_trainable)


class _Loss(torch.nn.Module):
    """`loss(visual, input_ids, targets, image_index)` as a module's forward over `model`'s
    parameters: what DistributedDataParallel wraps (it hooks into forward, not model.loss)."""

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, visual, input_ids, targets, image_index=None):
        return self.loss(visual, input_ids, targets, image_index)


def data_parallel_loss(model, fast, ranks):
    """The run's loss (fast.loss) in DistributedDataParallel over the parameters the forward uses
    inside the speedups (the stored working copies among them): call it inside `fast`."""
    return ranks.data_parallel(_Loss(model, fast.loss))


def rank_share(batch, ranks, max_caption_tokens):
    """(this rank's share of a global batch, the weight of its mean token loss, its target tokens,
    the batch's target tokens); with one process (`ranks` None) the whole batch and no weight. A
    rank whose share is empty (a last batch smaller than the number of processes) computes the
    first caption's loss with weight 0: every rank must run the forward and backward for the
    gradients to be summed."""
    total = target_count([t for _, t in batch], max_caption_tokens)
    if ranks is None:
        return batch, None, total, total
    share = ranks.share(batch)
    if not share:
        return batch[:1], 0.0, 0, total
    n = target_count([t for _, t in share], max_caption_tokens)
    return share, n / total, n, total


@torch.no_grad()
def evaluate(model, val, tokenizer, config, device, subset):
    """(val loss per target token over the subset's captions, greedy CIDEr over the subset, its
    captions)."""
    model.eval()
    sub_refs = {n: val.references[n] for n in subset}
    pairs = CaptionPairs((val.names, val.tokens), sub_refs, tokenizer)
    losses, weights = [], []
    for batch in pairs.batches(config.val_batch_size, shuffle=False):
        image_rows = lambda rows: val.tokens[rows].to(device)
        losses.append(batch_loss(model, batch, image_rows, tokenizer, config, device).item())
        weights.append(target_count([t for _, t in batch], config.max_caption_tokens))
    row_of = {n: i for i, n in enumerate(val.names)}
    rows = ((n, val.tokens[row_of[n]].float()) for n in subset)
    with autocast(device.type, config.autocast_dtype(device)):
        greedy = DecodeConfig(method="greedy", batch_size=config.val_batch_size)
        predictions = caption_features(model, tokenizer, rows, greedy, device=device,
                                       total=len(subset))
    score, _ = cider(*tokenize_pair(predictions, sub_refs, subset))
    model.train()
    loss = sum(l * w for l, w in zip(losses, weights)) / sum(weights)
    return loss, score, predictions


def train(model, train_pairs, val_pairs, tokenizer, config, checkpoint_path, device,
          log=TrainingLog(), ranks=None):
    """Train the trainable part of `model`, reporting to `log`; return (history, best epoch's row).

    The best val-CIDEr epoch's trainable tensors are kept in memory and written to
    `checkpoint_path` once training is over (the model is left holding them), so a killed run
    never leaves a checkpoint behind that looks like a finished one.

    ranks: this process's common.distributed.Ranks under torchrun (None: one process). Every rank
    trains on its share of each batch; rank 0 alone evaluates, reports to `log` and writes the
    checkpoint; the others return ([], None) and keep the last step's tensors."""
    main = ranks is None or ranks.is_main
    torch.manual_seed(config.seed)
    shuffler = random.Random(config.seed)
    steps_per_epoch = math.ceil(len(train_pairs.pairs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    subset = sorted(val_pairs.references)[:config.val_images or None]
    history, best, done = [], None, 0
    model.to(device)
    # the parameters the optimiser updates (inside the speedups the model may hold working copies)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer, params = make_optimizer(model, config)
    peft = list(model.peft_parameters().values())   # held while the bridge trains alone
    with speedups(model, train_pairs.tokens, config, device) as fast:
        parallel = None if ranks is None else data_parallel_loss(model, fast, ranks)
        for epoch in range(1, config.epochs + 1):
            # losses summed over target tokens, on the device, read every LOG_EVERY steps: the
            # epoch's, and those since the last read
            epoch_sum, recent_sum = (torch.zeros((), dtype=torch.float64, device=device)
                                     for _ in range(2))
            epoch_count = recent_count = 0
            bar = tqdm(train_pairs.batches(config.batch_size, True, shuffler, config.group_by_image),
                       total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                       disable=not main)
            for batch in bar:
                lr = lr_at(done, total, config)
                # under torchrun: this rank's share; its token-loss sum, summed over the ranks
                # when read
                share, weight, own, n = rank_share(batch, ranks, config.max_caption_tokens)
                loss = train_step(model, optimizer, params, share, tokenizer, config, device, lr,
                                  fast, parallel, weight,
                                  peft if epoch <= config.bridge_only_epochs else ())
                weighted = loss.detach().double() * own
                epoch_sum += weighted
                recent_sum += weighted
                epoch_count, recent_count, done = epoch_count + n, recent_count + n, done + 1
                if done % LOG_EVERY == 0:
                    if ranks is not None:
                        ranks.sum_(recent_sum)
                    recent = recent_sum.item() / recent_count
                    if main:
                        log.step(done, {"loss": recent, "lr": lr})
                    bar.set_postfix(loss=f"{recent:.3f}")
                    recent_sum.zero_()
                    recent_count = 0
            if ranks is not None:
                ranks.sum_(epoch_sum)
                if not main:
                    continue
            val_loss, val_cider, _ = evaluate(model, val_pairs, tokenizer, config, device, subset)
            row = dict(epoch=epoch, step=done, train_loss=epoch_sum.item() / epoch_count,
                       val_loss=val_loss, val_cider=val_cider)
            gates = model.gates()   # a gated bridge: how far each block's gate has opened
            if gates:
                row["gates"] = gates
            history.append(row)
            log.epoch(row)
            if best is None or val_cider > best["val_cider"]:
                best = row
                best_state = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()}
    if not main:
        return history, best
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(best_state[name])
    save_trainable(model, checkpoint_path, extra={"epoch": best["epoch"], "val_cider": best["val_cider"]})
    return history, best
