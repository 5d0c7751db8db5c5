"""Where each shape word of a caption looks: the peak of its attention map, and which drawn object
(if the objects are known, as in the demo world) has the peak inside its bounding box and which
holds the most attention (mean over its bounding box). A box, not the drawn outline: for a star,
cross or triangle part of the box is background, so "on the named shape" means "in its box".

Objects are dicts {"shape", "colour", "cx", "cy", "extent"} in original-image pixels (the demo's
`SceneObject`: centre and bounding-box side). Maps are the upsampled [H, W] arrays drawn over the
encoder's view (reporting/attention_maps.py); `View.to_original` maps view pixels back.
"""

import numpy as np
import torch

from reporting.attention_maps import peak


def caption_flags(caption, vocab, objects=None):
    """What is wrong with a caption, as the reports saw it: words repeated (a word twice in a row,
    or a pair of words said twice), and, where the image's objects are known, whether it names
    none of them (no shape word of the caption is the shape of an object in the image)."""
    words = [w.lower().strip(".,;:!?") for w in caption.split()]
    repeated = {a for a, b in zip(words, words[1:]) if a == b}
    pairs = list(zip(words, words[1:]))
    repeated |= {" ".join(p) for i, p in enumerate(pairs) if p in pairs[i + 2:]}
    flags = {"repeated_words": sorted(repeated)}
    if objects is not None:
        shapes = {ob["shape"] for ob in objects}
        flags["names_an_object"] = any(vocab.get(w) in shapes for w in words)
    return flags


def shape_vocabulary(shape_words):
    """{caption word: shape} from {shape: (synonyms...)}: each synonym and its plural; a
    two-word synonym ("plus sign", "round shape") counts by its first word."""
    vocab = {}
    for shape, words in shape_words.items():
        for w in words:
            head = w.split()[0]
            for form in (head, head + "s", head + "es"):
                vocab.setdefault(form.lower(), shape)
    return vocab


def _box(ob):
    half = ob["extent"] / 2
    return ob["cx"] - half, ob["cy"] - half, ob["cx"] + half, ob["cy"] + half


def object_at(objects, x, y):
    """Index of the object whose box holds (x, y) (nearest centre if several), else None."""
    inside = [i for i, ob in enumerate(objects)
              if _box(ob)[0] <= x <= _box(ob)[2] and _box(ob)[1] <= y <= _box(ob)[3]]
    if not inside:
        return None
    return min(inside, key=lambda i: (objects[i]["cx"] - x) ** 2 + (objects[i]["cy"] - y) ** 2)


def attention_per_object(drawn, view, objects):
    """Mean of the drawn map over each object's box (view pixels whose centre maps inside it)."""
    H, W = drawn.shape
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    ox, oy = view.to_original(xs, ys)
    m = np.asarray(drawn)
    out = []
    for ob in objects:
        x0, y0, x1, y1 = _box(ob)
        mask = (ox >= x0) & (ox <= x1) & (oy >= y0) & (oy <= y1)
        out.append(float(m[mask].mean()) if mask.any() else float("nan"))
    return out


def describe_peak(drawn, view, grid):
    """Where an upsampled map peaks: view pixel, original pixel and patch (row, col)."""
    r, c = peak(drawn)
    H, W = drawn.shape
    x, y = view.to_original(c + 0.5, r + 0.5)
    return {"view_xy": [int(c), int(r)], "image_xy": [round(float(x), 1), round(float(y), 1)],
            "patch": [int(r * grid[0] // H), int(c * grid[1] // W)]}


def shape_words_report(labels, drawn_maps, view, grid, vocab, objects=None):
    """One entry per shape word of the caption: where its map peaks and, with `objects`, the object
    under the peak, the object with the most attention, and whether each is the named shape."""
    out = []
    for i, label in enumerate(labels):
        word = label.lower().strip(".,;:!?")
        if word not in vocab:
            continue
        drawn = drawn_maps[i].numpy() if isinstance(drawn_maps[i], torch.Tensor) else drawn_maps[i]
        entry = {"word": label, "panel": i, "shape": vocab[word], **describe_peak(drawn, view, grid)}
        if objects is not None:
            hit = object_at(objects, *entry["image_xy"])
            means = attention_per_object(drawn, view, objects)
            best = int(np.nanargmax(means)) if not np.all(np.isnan(means)) else None
            entry["peak_object"] = None if hit is None else _object_label(objects[hit])
            entry["most_attended_object"] = None if best is None else _object_label(objects[best])
            entry["peak_on_named_shape"] = hit is not None and objects[hit]["shape"] == vocab[word]
            entry["most_attention_on_named_shape"] = (best is not None
                                                      and objects[best]["shape"] == vocab[word])
            entry["named_shape_in_image"] = any(ob["shape"] == vocab[word] for ob in objects)
        out.append(entry)
    return out


def _object_label(ob):
    return f"{ob['colour']} {ob['shape']} at ({ob['cx']:.0f}, {ob['cy']:.0f})"


def count_hits(summaries):
    """Totals over images: shape words, and how many peak on / attend most to the named shape."""
    words = [w for s in summaries for w in s.get("shape_words", []) if "peak_on_named_shape" in w]
    return {"shape_words": len(words),
            "peak_on_named_shape": sum(w["peak_on_named_shape"] for w in words),
            "most_attention_on_named_shape": sum(w["most_attention_on_named_shape"] for w in words),
            "named_shape_in_image": sum(w["named_shape_in_image"] for w in words)}
