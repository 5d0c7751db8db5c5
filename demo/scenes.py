"""The demo world's images: procedurally drawn scenes of coloured shapes, with captions.

`render_scene(cfg, rng, n_objects)` draws one scene and returns the image together with what was
drawn (`Scene`: objects with shape, colour, size word, centre, size), so captions and tests can be
checked against the drawing. `write_hw3_data(root, cfg)` writes the course's `hw3_data` layout:
p1 single-object PNGs named `{class_id}_{image_id}.png` with `id2label.json`, p2 JPEG
scenes with COCO-style `train.json` / `val.json`, and five p3 images under the course's names.

Every image is drawn from its own random stream, seeded by (seed, split, index), so the files are
byte-identical for a fixed seed and one split can be regenerated without the others.
"""
import itertools
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (250, 120, 190),
    "cyan": (20, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
# Words a caption may use for a shape; the first is the class name used in id2label.json.
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",),
    "heart": ("heart",),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
BACKGROUNDS = ("striped", "checkered", "speckled", "plain")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# The six splits, each with its own random stream; "clip_single" is the demo CLIP's extra
# single-object training pool (never written to hw3_data).
SPLIT_CODES = {"p1": 1, "train": 2, "val": 3, "p3": 4, "clip_single": 5}
P3_NAMES = ("bike", "girl", "sheep", "ski", "umbrella")
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: anti-aliased, deterministic


@dataclass
class SceneConfig:
    seed: int = 0
    image_size: int = 64
    n_train: int = 3000
    n_val: int = 500
    n_classes: int = 48            # p1 classes (colour x shape); at most len(shapes) * len(colours)
    n_p1_per_class: int = 10
    captions_per_image: int = 5
    min_objects: int = 1
    max_objects: int = 3
    object_min_frac: float = 0.25  # object extent as a fraction of the image side
    object_max_frac: float = 0.40
    # single-object images (p1, and the demo CLIP's extra pool): one larger object near the centre
    single_min_frac: float = 0.40
    single_max_frac: float = 0.65
    single_jitter: float = 0.12    # largest offset of its centre from the image centre (fraction)
    shapes: tuple = ("circle", "square", "triangle", "star", "cross", "diamond")
    colours: tuple = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    jpeg_quality: int = 95

    def __post_init__(self):
        self.shapes = tuple(self.shapes)
        self.colours = tuple(self.colours)
        self.validate()

    def validate(self):
        def fail(name, why):
            raise ValueError(f"SceneConfig.{name}={getattr(self, name)!r}: {why}")

        if self.image_size < 16:
            fail("image_size", "must be at least 16 pixels")
        for name in ("n_train", "n_val", "n_p1_per_class", "n_classes"):
            if getattr(self, name) < 1:
                fail(name, "must be at least 1 (zero images is not a dataset)")
        if self.captions_per_image < 1:
            fail("captions_per_image", "must be at least 1")
        if self.captions_per_image > MAX_CAPTIONS:
            fail("captions_per_image", f"the grammar guarantees at most {MAX_CAPTIONS} different captions")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or not self.shapes or len(set(self.shapes)) != len(self.shapes):
            fail("shapes", f"must be distinct names from {SHAPES}")
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown or not self.colours or len(set(self.colours)) != len(self.colours):
            fail("colours", f"must be distinct names from {tuple(COLOURS)}")
        if self.n_classes > len(self.shapes) * len(self.colours):
            fail("n_classes", f"more classes than shapes x colours = {len(self.shapes)} x {len(self.colours)}")
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            fail("max_objects" if self.max_objects > 3 else "min_objects",
                 "need 1 <= min_objects <= max_objects <= 3")
        if not 0.05 <= self.object_min_frac <= self.object_max_frac <= 0.9:
            fail("object_min_frac" if self.object_min_frac < 0.05 else "object_max_frac",
                 "need 0.05 <= object_min_frac <= object_max_frac <= 0.9")
        if not 0.05 <= self.single_min_frac <= self.single_max_frac <= 0.95:
            fail("single_min_frac" if self.single_min_frac < 0.05 else "single_max_frac",
                 "need 0.05 <= single_min_frac <= single_max_frac <= 0.95")
        if not 0.0 <= self.single_jitter <= 0.5:
            fail("single_jitter", "must be in [0, 0.5]")
        if not 1 <= self.jpeg_quality <= 100:
            fail("jpeg_quality", "must be in 1..100")

    def classes(self):
        """The p1 classes as (colour, shape) pairs, class id = position in the list.

        Walked diagonally through colour x shape so that a prefix (n_classes smaller than the full
        product) still covers every colour and every shape.
        """
        C, S = len(self.colours), len(self.shapes)
        return [(self.colours[k % C], self.shapes[(k // C + k % C) % S]) for k in range(self.n_classes)]


def class_label(colour, shape):
    return f"{colour} {shape}"


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str        # "small" or "large"
    cx: float        # centre, pixels
    cy: float
    extent: float    # side of the bounding box, pixels

    def where(self, image_size):
        """Where the centre lies, in words: "in the top left", "at the top", "in the centre", ..."""
        col = ("left", "", "right")[min(int(3 * self.cx / image_size), 2)]
        row = ("top", "", "bottom")[min(int(3 * self.cy / image_size), 2)]
        if row and col:
            return f"in the {row} {col}"
        if row:
            return f"at the {row}"
        return f"on the {col}" if col else "in the centre"


@dataclass
class Scene:
    image: Image.Image
    objects: list
    background: str
    captions: list = field(default_factory=list)


def rng_for(seed, split, index):
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], index]))


# ---------------------------------------------------------------------------------------------
# Drawing

def _polygon(shape, c, r):
    """Vertices of `shape` centred on c=(x, y) with circumradius r (in supersampled pixels)."""
    x, y = c

    def ring(n, radius, phase):
        return [(x + radius * math.cos(phase + 2 * math.pi * i / n),
                 y + radius * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "square":
        h = r * 0.8
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return ring(3, r, -math.pi / 2)
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.42, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = r * 0.95, r * 0.32
        return [(x - b, y - a), (x + b, y - a), (x + b, y - b), (x + a, y - b), (x + a, y + b),
                (x + b, y + b), (x + b, y + a), (x - b, y + a), (x - b, y + b), (x - a, y + b),
                (x - a, y - b), (x - b, y - b)]
    if shape == "diamond":
        return [(x, y - r), (x + r * 0.7, y), (x, y + r), (x - r * 0.7, y)]
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            hx = 16 * math.sin(t) ** 3
            hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x + r * hx / 17, y - r * (hy + 2) / 17))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng, size):
    """A muted, textured background (grey-ish so every object colour stands out)."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = rng.integers(95, 165, size=3).astype(np.float32)
    base = base.mean() + 0.35 * (base - base.mean())  # low saturation
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "striped":
        period = rng.uniform(5, 12)
        angle = rng.uniform(0, math.pi)
        wave = np.sign(np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period))
        tex = 18 * wave
    elif kind == "checkered":
        cell = int(rng.integers(4, 10))
        tex = 18 * (((xx // cell + yy // cell) % 2) * 2 - 1)
    elif kind == "speckled":
        tex = rng.normal(0, 14, size=(size, size)).astype(np.float32)
    else:
        tex = 3 * rng.normal(0, 1, size=(size, size)).astype(np.float32)
    img = base[None, None, :] + tex[:, :, None]
    return np.clip(img, 0, 255), kind


def _place(rng, sizes, image_size):
    """(extents, centres) for objects inside the image and not overlapping.

    Uniform rejection sampling; after every 100 failed tries the objects shrink by 10%."""
    for attempt in range(1000):
        if attempt and attempt % 100 == 0:
            sizes = [0.9 * e for e in sizes]
        centres = [rng.uniform(e / 2 + 1, image_size - e / 2 - 1, size=2) for e in sizes]
        ok = all(np.abs(centres[i] - centres[j]).max() >= (sizes[i] + sizes[j]) / 2 + 1
                 for i, j in itertools.combinations(range(len(sizes)), 2))
        if ok:
            return sizes, centres
    raise RuntimeError(f"could not place {len(sizes)} objects without overlap in {image_size}px")


def draw_objects(canvas, objects):
    """Paint objects (anti-aliased) onto an HxWx3 float array, in place."""
    size = canvas.shape[0]
    big = size * SUPERSAMPLE
    for ob in objects:
        mask = Image.new("L", (big, big), 0)
        c = (ob.cx * SUPERSAMPLE, ob.cy * SUPERSAMPLE)
        r = ob.extent * SUPERSAMPLE / 2
        d = ImageDraw.Draw(mask)
        if ob.shape == "circle":
            rr = r * 0.85
            d.ellipse([c[0] - rr, c[1] - rr, c[0] + rr, c[1] + rr], fill=255)
        else:
            d.polygon(_polygon(ob.shape, c, r), fill=255)
        alpha = np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32)[:, :, None] / 255.0
        colour = np.asarray(COLOURS[ob.colour], dtype=np.float32)
        canvas *= 1 - alpha
        canvas += alpha * colour


def render_scene(cfg, rng, n_objects=None, classes=None, portrait=False):
    """Draw one scene. `classes`, if given, fixes the (colour, shape) of each object.

    portrait=True draws one object of the single-object size range near the centre (p1 images)."""
    if portrait:
        n_objects = 1
    elif n_objects is None:
        n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    if classes is None:
        classes = [(cfg.colours[rng.integers(len(cfg.colours))], cfg.shapes[rng.integers(len(cfg.shapes))])
                   for _ in range(n_objects)]
    size = cfg.image_size
    if portrait:
        lo, hi = cfg.single_min_frac * size, cfg.single_max_frac * size
        e = float(rng.uniform(lo, hi))
        c = size / 2 + rng.uniform(-cfg.single_jitter, cfg.single_jitter, size=2) * size
        extents, centres = [e], [np.clip(c, e / 2 + 1, size - e / 2 - 1)]
    else:
        lo, hi = cfg.object_min_frac * size, cfg.object_max_frac * size
        extents = [float(rng.uniform(lo, hi)) for _ in classes]
        extents, centres = _place(rng, extents, size)
    mid = (lo + hi) / 2
    objects = [SceneObject(shape=s, colour=c, size="small" if e < mid else "large",
                           cx=float(p[0]), cy=float(p[1]), extent=e)
               for (c, s), e, p in zip(classes, extents, centres)]
    canvas, background = _background(rng, cfg.image_size)
    draw_objects(canvas, objects)
    image = Image.fromarray(np.round(canvas).astype(np.uint8), "RGB")
    scene = Scene(image=image, objects=objects, background=background)
    scene.captions = make_captions(scene, rng, cfg.captions_per_image, cfg.image_size)
    return scene


# ---------------------------------------------------------------------------------------------
# Captions

def _article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(ob, rng, with_size=None):
    """'red circle', 'small red disc', 'big red box', ..."""
    words = SHAPE_WORDS[ob.shape]
    noun = words[0] if rng.random() < 0.6 else words[rng.integers(len(words))]
    if with_size is None:
        with_size = rng.random() < 0.35
    if with_size:
        sw = SIZE_WORDS[ob.size]
        return f"{sw[rng.integers(len(sw))]} {ob.colour} {noun}"
    return f"{ob.colour} {noun}"


def _plural(noun):
    if noun.endswith("x") or noun.endswith("ss"):
        return noun + "es"
    return noun + "s"


def _relation(a, b):
    """Where a is relative to b, in words."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _join(phrases):
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


MAX_CAPTIONS = 8


def _caption_templates(scene, size):
    """Functions rng -> caption; each template a different sentence form."""
    obs = scene.objects
    n = len(obs)
    bg = scene.background
    T = []
    if n == 1:
        o = obs[0]
        T += [
            lambda r: _article(_describe(o, r)),
            lambda r: "a photo of " + _article(_describe(o, r)),
            lambda r: f"there is {_article(_describe(o, r))} {o.where(size)}",
            lambda r: f"{_article(_describe(o, r))} on {_article(bg)} background",
            lambda r: f"an image with one {_describe(o, r)}",
            lambda r: f"{o.where(size)} of the picture is {_article(_describe(o, r))}",
            lambda r: f"a single {_describe(o, r)} on a {bg} background",
            lambda r: f"one {_describe(o, r, with_size=True)} {o.where(size)}",
            lambda r: f"a picture of {_article(_describe(o, r))}",
        ]
    else:
        count = COUNT_WORDS[n]
        same = len({(o.colour, o.shape) for o in obs}) == 1
        T += [
            lambda r: _join([_article(_describe(o, r)) for o in obs]),
            lambda r: f"{count} {['shapes', 'objects', 'things'][r.integers(3)]}: "
                      + _join([_article(_describe(o, r)) for o in obs]),
            lambda r: f"there are {count} shapes on {_article(bg)} background",
            lambda r: "a photo of " + _join([_article(_describe(o, r)) for o in reversed(obs)]),
            lambda r: _join([f"{_article(_describe(o, r))} {o.where(size)}" for o in obs]),
            lambda r: f"{_article(_describe(obs[0], r))} {_relation(obs[0], obs[1])} "
                      f"{_article(_describe(obs[1], r))}",
            lambda r: f"{_article(_describe(obs[1], r))} {_relation(obs[1], obs[0])} "
                      f"{_article(_describe(obs[0], r))}",
            lambda r: f"an image with {count} shapes, "
                      + _join([_article(_describe(o, r)) for o in obs]),
        ]
        if n == 3:
            T.append(lambda r: f"{_article(_describe(obs[2], r))} {_relation(obs[2], obs[0])} "
                               f"{_article(_describe(obs[0], r))}")
        if same:
            o = obs[0]
            T.append(lambda r: f"{count} {o.colour} {_plural(SHAPE_WORDS[o.shape][0])}")
    return T


def make_captions(scene, rng, k, size):
    """k different captions for the scene, each from a different template."""
    templates = _caption_templates(scene, size)
    order = rng.permutation(len(templates))
    captions = []
    for i in order:
        for _ in range(5):
            c = templates[i](rng)
            if c not in captions:
                captions.append(c)
                break
        if len(captions) == k:
            return captions
    raise RuntimeError(f"only {len(captions)} different captions for a scene; asked for {k}")


# ---------------------------------------------------------------------------------------------
# Datasets

def p1_scenes(cfg):
    """(class_id, image_id, Scene) for every p1 image: single objects, n_p1_per_class per class."""
    out = []
    for k, (colour, shape) in enumerate(cfg.classes()):
        for j in range(cfg.n_p1_per_class):
            image_id = k * cfg.n_p1_per_class + j
            rng = rng_for(cfg.seed, "p1", image_id)
            out.append((k, image_id, render_scene(cfg, rng, classes=[(colour, shape)], portrait=True)))
    return out


def single_object_scenes(cfg, n, split="clip_single", start=0):
    """n portraits (as p1) with uniformly drawn (colour, shape) from the full colour x shape set."""
    return [render_scene(cfg, rng_for(cfg.seed, split, start + i), portrait=True) for i in range(n)]


def split_scenes(cfg, split, n, progress=True):
    return [render_scene(cfg, rng_for(cfg.seed, split, i))
            for i in tqdm(range(n), desc=f"draw {split}", disable=not progress, leave=False)]


def _save_jpeg(image, path, quality):
    image.save(path, format="JPEG", quality=quality, subsampling=0, optimize=False)


def p2_file_name(split, i):
    return f"demo_{split}_{i:06d}.jpg"


def write_hw3_data(root, cfg, progress=True):
    """Write the demo world's hw3_data folder at `root` (replacing it), atomically.

    Everything is written into a temporary sibling folder which is renamed into place at the end,
    so an interrupted run never leaves a half-written dataset at `root`.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=root.parent))
    try:
        _write_into(tmp, cfg, progress)
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{root.name}-", dir=root.parent))
            os.replace(root, old / root.name)
            os.replace(tmp, root)
            shutil.rmtree(old)
        else:
            os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def p3_objects(cfg):
    """What the p3 images show, for the attention figures (stages/visualize.py): the words a
    caption may use for each shape, and each image's objects in pixels (centre, bounding-box
    side): {"shape_words": {shape: [word, ...]}, "images": {name: [{"shape", "colour", "cx",
    "cy", "extent"}, ...]}}."""
    images = {}
    for i, name in enumerate(P3_NAMES):
        scene = render_scene(cfg, rng_for(cfg.seed, "p3", i))
        images[name] = [{"shape": ob.shape, "colour": ob.colour, "cx": ob.cx, "cy": ob.cy,
                         "extent": ob.extent} for ob in scene.objects]
    return {"shape_words": {shape: list(words) for shape, words in SHAPE_WORDS.items()},
            "images": images}


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _write_into(root, cfg, progress):
    p1 = root / "p1_data"
    (p1 / "val").mkdir(parents=True)
    _write_json(p1 / "id2label.json", {str(k): class_label(c, s) for k, (c, s) in enumerate(cfg.classes())})
    for class_id, image_id, scene in tqdm(p1_scenes(cfg), desc="write p1", disable=not progress, leave=False):
        scene.image.save(p1 / "val" / f"{class_id}_{image_id}.png", format="PNG")

    p2 = root / "p2_data"
    ann_id = 0
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        folder = p2 / "images" / split
        folder.mkdir(parents=True)
        images, annotations = [], []
        for i, scene in enumerate(split_scenes(cfg, split, n, progress)):
            name = p2_file_name(split, i)
            _save_jpeg(scene.image, folder / name, cfg.jpeg_quality)
            image_id = i + (0 if split == "train" else cfg.n_train)
            images.append({"file_name": name, "id": image_id})
            for c in scene.captions:
                annotations.append({"caption": c, "image_id": image_id, "id": ann_id})
                ann_id += 1
        _write_json(p2 / f"{split}.json", {"images": images, "annotations": annotations})

    p3 = root / "p3_data" / "images"
    p3.mkdir(parents=True)
    for i, name in enumerate(P3_NAMES):
        scene = render_scene(cfg, rng_for(cfg.seed, "p3", i))
        _save_jpeg(scene.image, p3 / f"{name}.jpg", cfg.jpeg_quality)

