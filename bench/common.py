"""What the benchmarks share: models of the demo and the real (course) size with random weights,
real JPEG files, a GPT-2-sized tokenizer, captions, timing.

Nothing here is downloaded. The real-size image encoder is timm's ViT-L/14 CLIP tower with
random weights, saved to a temp file and loaded through `evaluation.encoders.build_encoder` (the
pipeline's own path, every key checked); the real-size decoder is a random GPT-2 small.
"""
import contextlib
import copy
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioning.bridges import BridgeConfig
from captioning.captioner import Captioner, CaptionerConfig
from evaluation.encoders import EncoderConfig, build_encoder, encoder_id
from captioning.gpt2 import GPT2, GPT2Config, load_course_checkpoint
from captioning.peft import PeftConfig
from captioning.tokenizer import EOT, Tokenizer
from speed import SpeedConfig
from training.loop import make_optimizer, speedups, train_step

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEMO_DECODER = Path("data/demo/text/decoder_model.bin")   # params.yaml: world.decoder
DEMO_CLIP = Path("data/demo/clip_demo.pt")
REAL_ENCODER = "vit_large_patch14_clip_quickgelu_224"   # ViT-L/14, 257 tokens x 1024
# A random stand-in for the demo CLIP's tower before `dvc repro` has made it: 64 px, patch 8,
# width 128, 4 layers -> 65 x 128 tokens.
DEMO_TIMM = dict(name="vit_base_patch16_clip_quickgelu_224", image_size=64,
                 model_kwargs=dict(patch_size=8, embed_dim=128, depth=4, num_heads=4))
DEMO_GPT2 = GPT2Config(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128)
DEMO_N_HEAD = 4          # worlds/demo.yaml: world.decoder_heads
COURSE_IMAGE = (640, 480)  # typical size of the course's COCO/Flickr images
DEMO_IMAGE = (64, 64)
DEMO_TOKENS = (5, 128)   # the demo CLIP at 64 px: 1 + 2 x 2 image tokens x 128


def add_device_args(parser):
    """--device and --threads, shared by the CPU-first benchmarks (see `use_device`)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch CPU threads")


def use_device(args):
    """torch.device(args.device), with torch's CPU threads set to args.threads."""
    torch.set_num_threads(args.threads)
    return torch.device(args.device)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


class Stopwatch:
    """Wall seconds of a block, the device synchronised at both ends."""

    def __init__(self, device="cpu"):
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds += time.perf_counter() - self._start


# --- images ------------------------------------------------------------------------------------

def write_jpegs(folder, n, size=COURSE_IMAGE, seed=0, distinct=16):
    """`n` JPEG files (quality 90) in `folder`: `distinct` different smooth random pictures, the
    rest byte copies of them (decoding costs the same; writing stays fast)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    blobs = []
    for i in range(min(n, distinct)):
        small = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        blobs.append(path.read_bytes())
    paths = []
    for i in range(n):
        path = folder / f"img_{i:05d}.jpg"
        if i >= len(blobs):
            path.write_bytes(blobs[i % len(blobs)])
        paths.append(path)
    return paths


# --- encoders ----------------------------------------------------------------------------------

def random_timm_encoder(name, tmpdir, device="cpu", image_size=None, model_kwargs=None, seed=0):
    """(ImageEncoder, encoder_id) of a timm model with random weights, built by build_encoder."""
    import timm
    kwargs = dict(model_kwargs or {})
    if image_size:
        kwargs["img_size"] = image_size
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    weights = Path(tmpdir) / f"{name}_random.pth"
    torch.save(model.state_dict(), weights)
    del model
    cfg = EncoderConfig(kind="timm", name=name, weights=str(weights), image_size=image_size,
                        model_kwargs=model_kwargs or {})
    return build_encoder(cfg, device=device), encoder_id(cfg)


def demo_encoder(tmpdir, device="cpu"):
    """The demo world's CLIP tower if it has been made, else a random one of its shape."""
    if DEMO_CLIP.is_file():
        cfg = EncoderConfig(kind="clip", name=str(DEMO_CLIP))
        return build_encoder(cfg, device=device), encoder_id(cfg), str(DEMO_CLIP)
    enc, eid = random_timm_encoder(tmpdir=tmpdir, device=device, **DEMO_TIMM)
    return enc, eid, "random ViT 64px/8, 4 x 128 (no demo CLIP found)"


def real_encoder(tmpdir, device="cpu"):
    enc, eid = random_timm_encoder(REAL_ENCODER, tmpdir, device=device)
    return enc, eid, f"timm {REAL_ENCODER}, random weights"


# --- decoders, captioners ----------------------------------------------------------------------

def demo_decoder():
    if DEMO_DECODER.is_file():
        return load_course_checkpoint(DEMO_DECODER, n_head=DEMO_N_HEAD), str(DEMO_DECODER)
    torch.manual_seed(0)
    return GPT2(DEMO_GPT2), "random GPT-2 4 x 128, vocab 512 (no demo decoder found)"


def real_decoder():
    torch.manual_seed(0)
    return GPT2(GPT2Config()), "random GPT-2 small 12 x 768, vocab 50257"


def parse_variant(text):
    """'gated_cross:lora' -> ('gated_cross', 'lora')."""
    bridge, _, method = text.partition(":")
    if not method:
        raise SystemExit(f"variant {text!r}: expected BRIDGE:PEFT, e.g. gated_cross:lora")
    return bridge, method


def build_variant(decoder, variant, visual_width, visual_tokens, seed=0, perturb=False):
    """A Captioner on a copy of `decoder` (the original stays plain, for the next variant).

    perturb: move the zero-initialised parts (gates, LoRA B, adapter up-projections) off zero,
    as after some training, so that nothing is skipped or trivially constant."""
    bridge, method = parse_variant(variant)
    config = CaptionerConfig(decoder=decoder.config, visual_width=visual_width,
                             visual_tokens=visual_tokens, bridge=BridgeConfig.of(bridge),
                             peft=PeftConfig.of(method))
    torch.manual_seed(seed)
    model = Captioner(config, copy.deepcopy(decoder))
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


# --- training steps ----------------------------------------------------------------------------

# Every speed switch of train.speed off: the plain loop of training/loop.py (fp32 weights cast by
# autocast at every use, the table's rows gathered by torch's index and copied to the device).
SPEED_OFF = SpeedConfig(stored_weights=False, features_on_device=False, numpy_gather=False)


class IdTokenizer:
    """What training.loop.batch_loss reads of a tokenizer: the end token's id."""

    def __init__(self, eot_id):
        self.eot_id = eot_id


class OtherRows:
    """A TrainingSpeedups whose image tokens come from `rows(indices)` instead of its table
    (HDF5 reads, an encoder run at every step): everything else is the run's own."""

    def __init__(self, fast, rows):
        self._fast, self.rows = fast, rows

    def __getattr__(self, name):
        return getattr(self._fast, name)


@contextlib.contextmanager
def training_steps(model, tokens, tokenizer, config, device, store_trainable=True, fused=None):
    """Inside: step(batch, lr, rows=None) -> the loss tensor: training.loop.train_step as train()
    takes it, the model moved to `device`, AdamW by make_optimizer (fused=None: fused on a GPU),
    inside the run's TrainingSpeedups (config.speed) over the image-token table `tokens`.
    rows: a callable indices -> image tokens on the device, read instead of the table's rows
    (HDF5 reads, an encoder run at every step). The step does not wait for the device (nor does
    train()): read the loss, or `sync`, to time it."""
    device = torch.device(device)
    model.to(device).train()
    optimizer, params = make_optimizer(model, config, fused)
    with speedups(model, tokens, config, device, store_trainable) as fast:
        def step(batch, lr, rows=None):
            return train_step(model, optimizer, params, batch, tokenizer, config, device, lr,
                              fast if rows is None else OtherRows(fast, rows))
        yield step


# --- text --------------------------------------------------------------------------------------

def synthetic_tokenizer(vocab_size=50257):
    """A real byte-level BPE Tokenizer in GPT-2's format and size (the GPT-2 files cannot be
    downloaded here): the 256 byte symbols, then merges spelling space-led lower-case 'words'
    ('Ġa', 'Ġab', 'Ġabc', ...), then <|endoftext|> as the last id, as in GPT-2."""
    from tokenizers.pre_tokenizers import ByteLevel
    encoder = {s: i for i, s in enumerate(sorted(ByteLevel.alphabet()))}
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges, frontier = [], ["Ġ"]
    while len(encoder) < vocab_size - 1:
        nxt = []
        for prefix in frontier:
            for c in letters:
                tok = prefix + c
                if len(encoder) == vocab_size - 1:
                    break
                encoder[tok] = len(encoder)
                merges.append((prefix, c))
                nxt.append(tok)
        frontier = nxt
    encoder[EOT] = len(encoder)
    return Tokenizer(encoder, merges, identity=f"synthetic-{vocab_size}")


def write_vocab(tokenizer, folder):
    """encoder.json and vocab.bpe of a Tokenizer (e.g. synthetic_tokenizer's) in `folder`, in
    GPT-2's file format; returns their paths."""
    import json
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder_json, vocab_bpe = folder / "encoder.json", folder / "vocab.bpe"
    encoder_json.write_text(json.dumps(tokenizer._encoder, ensure_ascii=False), encoding="utf-8")
    vocab_bpe.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer._merges),
                         encoding="utf-8")
    return encoder_json, vocab_bpe


def random_captions(n, vocab_size, seed=0, lengths=(8, 20)):
    """`n` token-id lists with lengths uniform in `lengths` (course captions: ~10-15 tokens),
    ids below the end token (the last id)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size - 1) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def caption_batches(n_images, n_batches, batch_size, vocab_size, by_image=False, per_image=5,
                    seed=0):
    """`n_batches` training batches of (image row, caption ids) pairs over a table of `n_images`
    images, composed as an epoch of the course's train split composes them
    (training.loop.CaptionPairs.batches). by_image=False, the captions in random order: of
    batches of 64 of the split's 53,020 captions ~14% hold one image twice, the rest none, so here
    every batch holds distinct images (which needs n_images >= batch_size); since training reads
    each image of a batch once, a small table sampled with replacement would flatter every step.
    by_image=True (train.group_by_image): each image's `per_image` captions one after another,
    the images in random order."""
    rng = random.Random(seed)
    captions = random_captions(n_batches * batch_size, vocab_size, seed=seed + 1)
    if by_image:
        rows = []
        while len(rows) < len(captions):
            images = list(range(n_images))
            rng.shuffle(images)
            rows += [i for i in images for _ in range(per_image)]
    else:
        if n_images < batch_size:
            raise SystemExit(f"{n_images} images cannot fill a batch of {batch_size} captions "
                             "of distinct images: use more images or a smaller batch")
        rows = [i for _ in range(n_batches) for i in rng.sample(range(n_images), batch_size)]
    pairs = list(zip(rows, captions))
    return [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]


BATCHES = ("random", "by image")   # how an epoch composes its batches (train.group_by_image)


def add_batches_arg(p):
    p.add_argument("--batches", nargs="+", choices=BATCHES, default=["random"],
                   help="training batches: 'random' (an epoch's captions in random order: the "
                        "images of a batch distinct) and/or 'by image' (each image's 5 captions "
                        "together: train.group_by_image)")


def batches_by_kind(kinds, n_images, n_batches, batch_size, vocab_size):
    """{kind: caption_batches(...)} for each kind of BATCHES in `kinds`, the same captions in each."""
    return {kind: caption_batches(n_images, n_batches, batch_size, vocab_size, kind == "by image")
            for kind in kinds}


def mean_text_len(batches):
    """Positions per caption as a batch pads them, averaged over `batches`: its longest caption
    plus the start and end tokens (what bench/flops.py counts per caption)."""
    return sum(max(len(c) for _, c in b) + 2 for b in batches) / len(batches)


def captions_per_image(batches):
    """Captions per distinct image of a batch, over `batches` (what a batch computes once)."""
    return sum(map(len, batches)) / sum(len({row for row, _ in b}) for b in batches)


def fmt_rate(x):
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"
