"""Problem 3: per-word attention maps of the released captioner: `python -m stages.visualize`.

For every p3 image and for the val images with the highest and the lowest CLIPScore of the
selected variant, caption it with release/ (its checkpoint, tokenizer and decoding settings),
capturing the attention over the image tokens, and draw the course's grid: the image and one
heatmap per word, the end token last. Also draws the encoder's positional-embedding similarity.

Reads params `world` and `visualize` (stages.params.VisualizeConfig: the attention maps'
settings, overrides of the released decoding settings, and `objects`, a JSON file of what the
p3 images show, with which the summary tells which object each shape word looks at). Image
tokens come from the feature cache (features/p3.h5, features/val.h5), as in the decode stage, so
the captions are the pipeline's own. Each caption is flagged for repeated words and, where the
objects are known, for naming none of them.

Writes figures/attention/ whole: <p3 name>.png, layers_<first p3 name>.png (each decoder layer's
maps, one row per layer), val_best.png, val_worst.png, summary.json; and
figures/pos_embed_similarity.png.
"""
import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common.atomic import atomic_dir, write_json
from common.device import resolve_device
from common.errors import read_json, run_stage
from common.imageio import list_images, load_rgb
from evaluation.features import FeatureFile
from inference.release import load_release
from reporting.attention_maps import (AttentionMapConfig, caption_with_maps, encoder_view,
                                      plot_attention_grid, plot_layer_comparison)
from reporting.attention_summary import (caption_flags, count_hits, describe_peak, shape_vocabulary,
                                         shape_words_report)
from common.params import from_section, load_params
from reporting.pos_embed import patch_positional_embeddings, plot_similarity_grid
from stages.world import World

OUT = Path("figures/attention")
POS_EMBED = Path("figures/pos_embed_similarity.png")


@dataclass
class VisualizeConfig(AttentionMapConfig):
    decode: dict = field(default_factory=dict)  # overrides of the released decoding settings
    objects: Optional[str] = None  # JSON of what the p3 images show (demo.scenes.p3_objects)


def image_paths(folder):
    return {p.stem: p for p in list_images(folder)}


class Drawer:
    """Captions one image from its cached tokens and draws its attention grid."""

    def __init__(self, model, tokenizer, encoder, decode_config, map_config, vocab):
        self.model, self.tokenizer, self.encoder = model, tokenizer, encoder
        self.decode_config, self.map_config, self.vocab = decode_config, map_config, vocab

    def __call__(self, folder, figure, features, name, image_path, title="", objects=None,
                 layers_figure=None):
        """Draw into folder/figure (and, with `layers_figure`, one row per decoder layer into
        folder/layers_figure); the summary names them under OUT (where they will end up)."""
        tokens = features[features.index_of(name)]
        caption, hyp, maps = caption_with_maps(self.model, self.tokenizer, tokens,
                                               self.decode_config, features.num_prefix_tokens,
                                               features.grid, self.map_config)
        view = encoder_view(self.encoder.preprocess, load_rgb(image_path))
        drawn = plot_attention_grid(folder / figure, view.image, maps, self.map_config,
                                    title=f"{name}: {caption}" + (f"\n{title}" if title else ""))
        layers = {}
        if layers_figure:
            plot_layer_comparison(folder / layers_figure, view.image, self.model, self.tokenizer,
                                  hyp, features.num_prefix_tokens, features.grid, self.map_config,
                                  title=f"{name}: {caption} (each decoder layer)")
            layers = {"layers_figure": str(OUT / layers_figure)}
        return {
            "name": name, "image": str(image_path), "figure": str(OUT / figure), "caption": caption,
            "ended": hyp.ended, **layers, **caption_flags(caption, self.vocab, objects),
            "words": [{"word": label, **describe_peak(d.numpy(), view, features.grid)}
                      for label, d in zip(maps.labels, drawn)],
            "shape_words": shape_words_report(maps.labels, drawn, view, features.grid,
                                              self.vocab, objects),
        }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--release", default="release")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    world = from_section(World, params.get("world"), f"{args.params}: world")
    settings = from_section(VisualizeConfig, params.get("visualize"), f"{args.params}: visualize")
    map_config = AttentionMapConfig(**{f.name: getattr(settings, f.name)
                                       for f in dataclasses.fields(AttentionMapConfig)})
    device = resolve_device()

    release = load_release(Path(args.release), world.decoder, device)
    model, tokenizer, encoder, selected = (release.model, release.tokenizer, release.encoder,
                                           release.selected)
    decode_config = release.decode_config(settings.decode, f"{args.params}: visualize.decode")
    variant = selected["variant"]
    known = read_json(settings.objects, "missing: set visualize.objects to the file of what the "
                      "p3 images show, or to null") if settings.objects else {}
    draw = Drawer(model, tokenizer, encoder, decode_config, map_config,
                  shape_vocabulary(known.get("shape_words", {})))

    p3 = FeatureFile("features/p3.h5")
    val = FeatureFile("features/val.h5")
    for f in (p3, val):
        f.require_encoder(model.config.encoder_id)
    p3_dir = world.image_dir("p3")
    p3_paths = image_paths(p3_dir)
    objects = known.get("images")
    scores_path = Path("predictions") / variant / "val_scores.json"
    rerun = f"run the score stage of the selected variant {variant}"
    scores = read_json(scores_path, f"missing: {rerun}")
    if not isinstance(scores, dict):
        sys.exit(f"{scores_path}: expected a JSON object {{image name: scores}}: {rerun}")
    ranked = sorted((s["clipscore"], n) for n, s in scores.items()
                    if isinstance(s, dict) and "clipscore" in s)
    if not ranked:
        sys.exit(f"{scores_path}: no per-image clipscore (score.metrics must include clipscore)")
    val_paths = image_paths(world.image_dir("val"))
    pe = patch_positional_embeddings(encoder)   # an encoder without them fails before any output

    with atomic_dir(OUT) as tmp:
        p3_entries = []
        for name in p3.names:
            if name not in p3_paths:
                sys.exit(f"{p3_dir}: no image for feature row {name!r}")
            p3_entries.append(draw(tmp, f"{name}.png", p3, name, p3_paths[name],
                                   objects=None if objects is None else objects.get(name),
                                   layers_figure=f"layers_{name}.png" if not p3_entries else None))
        val_entries = {}
        for which, (score, name) in (("best", ranked[-1]), ("worst", ranked[0])):
            if name not in val_paths:
                sys.exit(f"{world.image_dir('val')}: no image {name!r} (scored in {scores_path})")
            entry = draw(tmp, f"val_{which}.png", val, name, val_paths[name],
                         title=f"CLIPScore {score:.3f} ({which} of {len(ranked)} val images, "
                               f"variant {variant})")
            entry.update(clipscore=score, scored_caption=scores[name]["caption"])
            if entry["caption"] != entry["scored_caption"]:
                print(f"note: val image {name}: caption here differs from the scored one "
                      f"(decode settings changed since scoring?)", file=sys.stderr)
            val_entries[which] = entry
        summary = {
            "variant": variant, "decode": dataclasses.asdict(decode_config),  # as decoded here
            "maps": map_config.__dict__,
            "ground_truth_objects": objects is not None,
            "p3": p3_entries, "val": val_entries,
            "shape_word_hits": count_hits(p3_entries) if objects is not None else None,
        }
        write_json(tmp / "summary.json", summary)

    plot_similarity_grid(POS_EMBED, pe.cpu(), encoder.grid,
                         title=f"Positional embedding similarity ({encoder.grid[0]}x{encoder.grid[1]} patches)")
    for e in p3_entries:
        print(f"{e['name']}: {e['caption']}")
    if summary["shape_word_hits"]:
        h = summary["shape_word_hits"]
        print(f"shape words: {h['shape_words']}; attention peak in the named shape's bounding box: "
              f"{h['peak_on_named_shape']}; most attention on it: {h['most_attention_on_named_shape']}")


if __name__ == "__main__":
    run_stage(main)
