"""Training a captioner on cached image tokens: AdamW, warm-up + cosine, gradient clipping,
bf16 autocast on GPU; every epoch a train loss, a val loss and a val CIDEr from greedy decoding of a
val subset; the checkpoint with the best val CIDEr is kept (CIDEr peaks early while the loss
keeps falling)."""
import contextlib
import itertools
import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from models.checkpoint import save_trainable
from models.decoding import DecodeConfig, caption_features
from models.precision import DTYPES, StoredLinearWeights, autocast
from models.scoring import cider, tokenize_pair
from models.tokenizer import caption_batch, target_count

# torch.compile modes for `train.compile` ("none": eager); the ones that replay CUDA graphs record
# one graph per input shape, so their caption widths are padded to multiples of COMPILE_WIDTH_STEP.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
COMPILE_WIDTH_STEP = 8


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
    compile: str = "none"  # torch.compile mode of the training loss (COMPILE_MODES); "none": eager
    # Batches take an image's captions together (the images in random order), so that its
    # cross-attention keys/values, over half of a real-size step's FLOPs (the prefix bridge has
    # none: ~3%), are computed once for all of them; but a batch then holds 5x fewer images
    # (docs/performance.md: the demo's val loss came out 0.2-3% higher). False: the captions in
    # random order.
    group_by_image: bool = False

    def __post_init__(self):
        for name, least in (("epochs", 1), ("batch_size", 1), ("val_batch_size", 1),
                            ("max_caption_tokens", 2),  # 2: the start and the end token
                            ("val_images", 0), ("grad_clip", 0), ("lr", 0), ("warmup_steps", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: must be at least {least}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision={self.precision!r}: must be 'auto', 'fp32' or 'bf16'")
        if not isinstance(self.group_by_image, bool):
            raise ValueError(f"train.group_by_image={self.group_by_image!r}: must be true or false")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"train.compile={self.compile!r}: must be one of "
                             f"{', '.join(map(repr, COMPILE_MODES))}")

    @property
    def width_multiple(self):
        """Training rounds caption widths up to this: CUDA graphs are recorded per shape."""
        return COMPILE_WIDTH_STEP if self.compile in CUDA_GRAPH_MODES else 1

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


def gather_rows(tokens, rows):
    """`tokens[rows]`. A CPU tensor goes through numpy's take: torch's CPU index kernel on fp16
    rows of 257 x 1024 ran ~36x slower (bench/loader.py, docs/performance.md)."""
    if isinstance(tokens, torch.Tensor) and tokens.device.type == "cpu":
        return torch.from_numpy(tokens.numpy()[rows.numpy()])
    return tokens[rows]


def on_device_if_fits(tokens, device, share=0.5):
    """The whole image-token table on the GPU when it takes under `share` of its free memory: each
    step then gathers its rows there instead of on the host plus a host-to-device copy."""
    if torch.device(device).type != "cuda" or not isinstance(tokens, torch.Tensor):
        return tokens
    free, _ = torch.cuda.mem_get_info(device)
    return tokens.to(device) if tokens.numel() * tokens.element_size() < share * free else tokens


@contextlib.contextmanager
def compiled_loss(model, config):
    """Inside: `model.loss`, compiled by torch.compile in mode `config.compile` ("none": the
    eager method itself).

    The batch and caption-width dimensions are compiled as dynamic, so one compilation serves
    every batch (a size threshold inside inductor may add one more for small last batches). With
    CUDA graphs (CUDA_GRAPH_MODES) each distinct shape is recorded once, which the widths
    train_step rounds to COMPILE_WIDTH_STEP keep to a handful. Compiled code is cached per code
    object, so the cache is reset on entry and exit: Captioner.loss of an earlier model must not
    count against this one's recompile limit."""
    if config.compile == "none":
        yield model.loss
        return
    torch._dynamo.reset()
    compiled = torch.compile(model.loss, mode=config.compile)

    def loss(visual, input_ids, targets, image_index=None):
        # One graph serves every batch only if image_index is always given or never. With
        # group_by_image: always (an identity one where no image repeats). Without: never; the few
        # batches that repeat an image (~14% at batch 64) get its rows repeated, rather than every
        # batch paying an identity index_select per cross-attention layer.
        if config.group_by_image and image_index is None:
            image_index = torch.arange(len(input_ids), device=input_ids.device)
        elif not config.group_by_image and image_index is not None:
            visual, image_index = visual.index_select(0, image_index), None
        for t in (visual, input_ids, targets, image_index):
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        for t in (input_ids, targets):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        torch.compiler.cudagraph_mark_step_begin()   # the previous step's graph outputs are spent
        return compiled(visual, input_ids, targets, image_index)
    try:
        yield loss
    finally:
        torch._dynamo.reset()


def batch_loss(model, pairs, tokens, tokenizer, config, device, loss=None, width_multiple=1):
    """The loss of a batch of (image row, caption ids) pairs by `loss` (default: model.loss), the
    captions padded to a multiple of `width_multiple`. Each image of the batch is read and
    projected once, however many of its captions the batch holds."""
    rows = [i for i, _ in pairs]
    images = list(dict.fromkeys(rows))   # in order of first appearance
    image_index = None   # every caption its own image: caption b reads image b
    if len(images) < len(rows):
        place = {row: k for k, row in enumerate(images)}
        image_index = torch.tensor([place[row] for row in rows]).to(device, non_blocking=True)
    visual = gather_rows(tokens, torch.tensor(images)).to(device, non_blocking=True)
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


def train_step(model, optimizer, params, batch, tokens, tokenizer, config, device, lr, loss=None,
               stored=None):
    """One optimiser step on a batch of (image row, caption ids) pairs; returns the loss tensor.
    `tokens[rows]` gives the batch's image tokens (bench/train.py passes other sources); `loss`
    computes it (default: model.loss; see compiled_loss); `stored`: the StoredLinearWeights the
    model is inside, whose masters are among the optimizer's `params`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Gradients dropped before the forward: their memory is free for it (but for the masters'
    # fp32 buffers of StoredLinearWeights), and with CUDA graphs none of last step's graph
    # outputs is still held when the next replay reuses it.
    optimizer.zero_grad(set_to_none=True)
    if stored is not None:
        stored.zero_grad()
    loss = batch_loss(model, batch, tokens, tokenizer, config, device, loss, config.width_multiple)
    loss.backward()
    if stored is not None:
        stored.grads_to_masters()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    if stored is not None:
        stored.masters_to_copies()
    return loss


@contextlib.contextmanager
def training_steps(model, tokens, tokenizer, config, device, store_trainable=True):
    """Inside: step(batch, lr) -> loss tensor, one optimiser step as `train` takes it (bench/
    measures this same step), with what makes it fast around it: the model on `device`, fused
    AdamW on a GPU, the image-token table on the GPU if it fits, the Linear weights stored in the
    autocast dtype (StoredLinearWeights), the loss compiled if `config.compile` says so. Inside,
    the model holds working copies of its trainable Linear tensors: the trained values are in
    the parameters it held before (the masters), which it holds again on exit; do not move the
    model inside. store_trainable=False: only the frozen ones are stored, autocast casts the
    trainable ones at every use (bench/gpu.py compares)."""
    model.to(device).train()
    optimizer, params = make_optimizer(model, config)
    tokens = on_device_if_fits(tokens, device)
    with StoredLinearWeights(model, config.autocast_dtype(device), store_trainable) as stored, \
            compiled_loss(model, config) as loss:
        yield lambda batch, lr: train_step(model, optimizer, params, batch, tokens, tokenizer,
                                           config, device, lr, loss, stored)


@torch.no_grad()
def evaluate(model, val, tokenizer, config, device, subset):
    """(val loss per target token over the subset's captions, greedy CIDEr over the subset, its
    captions)."""
    model.eval()
    sub_refs = {n: val.references[n] for n in subset}
    pairs = CaptionPairs((val.names, val.tokens), sub_refs, tokenizer)
    losses, weights = [], []
    for batch in pairs.batches(config.val_batch_size, shuffle=False):
        losses.append(batch_loss(model, batch, val.tokens, tokenizer, config, device).item())
        weights.append(target_count([t for _, t in batch], config.max_caption_tokens))
    row_of = {n: i for i, n in enumerate(val.names)}
    rows = ((n, val.tokens[row_of[n]].float()) for n in subset)
    with autocast(device.type, config.autocast_dtype(device)):
        predictions = caption_features(model, tokenizer, rows, DecodeConfig(method="greedy"),
                                       batch_size=config.val_batch_size, device=device,
                                       total=len(subset))
    score, _ = cider(*tokenize_pair(predictions, sub_refs, subset))
    model.train()
    loss = sum(l * w for l, w in zip(losses, weights)) / sum(weights)
    return loss, score, predictions


def train(model, train_pairs, val_pairs, tokenizer, config, checkpoint_path, device,
          log=print):
    """Train the trainable part of `model`; return (history, best epoch's row).

    The best val-CIDEr epoch's trainable tensors are kept in memory and written to
    `checkpoint_path` once training is over (the model is left holding them), so a killed run
    never leaves a checkpoint behind that looks like a finished one."""
    torch.manual_seed(config.seed)
    shuffler = random.Random(config.seed)
    steps_per_epoch = math.ceil(len(train_pairs.pairs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    subset = sorted(val_pairs.references)
    if config.val_images:
        subset = subset[:config.val_images]
    history, best, done, start = [], None, 0, time.time()
    # The trainable parameters, on the device: inside training_steps the model may hold working
    # copies of some, and these are their masters.
    model.to(device)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with training_steps(model, train_pairs.tokens, tokenizer, config, device) as step:
        for epoch in range(1, config.epochs + 1):
            running, count = 0.0, 0
            bar = tqdm(train_pairs.batches(config.batch_size, True, shuffler, config.group_by_image),
                       total=steps_per_epoch,
                       desc=f"epoch {epoch}/{config.epochs}", leave=False)
            for batch in bar:
                loss = step(batch, lr_at(done, total, config))
                done += 1
                n = target_count([t for _, t in batch], config.max_caption_tokens)
                value = loss.item()   # one host-device sync per step
                running += value * n   # averages over target tokens, as the loss itself
                count += n
                bar.set_postfix(loss=f"{value:.3f}")
            val_loss, val_cider, _ = evaluate(model, val_pairs, tokenizer, config, device, subset)
            row = dict(epoch=epoch, train_loss=running / count, val_loss=val_loss, val_cider=val_cider,
                       seconds=round(time.time() - start, 1))
            history.append(row)
            log(f"epoch {epoch}: train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
                f"val CIDEr {val_cider:.4f}")
            if best is None or val_cider > best["val_cider"]:
                best = row
                best_state = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(best_state[name])
    save_trainable(model, checkpoint_path, extra={"epoch": best["epoch"], "val_cider": best["val_cider"]})
    return history, best
