"""Problem 3 and the report: per-word attention maps (forced onto known patches), word merging,
the encoder's view, positional-embedding similarity, the visualize stage on tiny models of both
bridge kinds, and the report rendered from fabricated pipeline outputs."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
import yaml
from clip.model import CLIP
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from torchvision import transforms as T

from reporting.attention_maps import (AttentionMapConfig, WordMaps, encoder_view, group_tokens,
                                   merge_groups, patch_maps, peak, plot_attention_grid,
                                   reduce_attention, select_layers, upsample)
from reporting.attention_summary import (count_hits, shape_vocabulary,
                                      shape_words_report)
from captioning.bridges import BridgeConfig
from captioning.captioner import Captioner, CaptionerConfig
from captioning.checkpoint import save_trainable
from evaluation.encoders import EncoderConfig, build_encoder, encoder_id
from evaluation.features import write_features
from captioning.gpt2 import GPT2, GPT2Config, course_state_dict, load_course_checkpoint
from captioning.peft import PeftConfig
from reporting.pos_embed import (cosine_similarity_matrix, patch_positional_embeddings,
                              plot_similarity_grid)
from reporting.report import ReportError
from captioning.tokenizer import EOT, Tokenizer

GRID = (4, 5)  # rows, columns: not square, so a transposed reshape cannot pass
PATCH = 10  # pixels per patch side: the image is 40 x 50 (H x W)
ROW, COL = 1, 3


def forced_attention(n_tokens=2, layers=2, heads=3, cls_mass=0.7):
    """[T, L, H, 1 + 20]: token 0 looks at patch (ROW, COL) (and the class token); token 1 at (3, 0)."""
    V = 1 + GRID[0] * GRID[1]
    att = torch.zeros(n_tokens, layers, heads, V)
    att[..., 0] = cls_mass
    att[0, ..., 1 + ROW * GRID[1] + COL] = 1 - cls_mass
    att[1, ..., 1 + 3 * GRID[1] + 0] = 1 - cls_mass
    return att


def test_map_forced_onto_one_patch_peaks_at_that_patch_in_the_image(tmp_path):
    att = forced_attention()
    per_token = reduce_attention(att, [0, 1], "mean", "mean")
    maps = patch_maps(per_token, num_prefix_tokens=1, grid=GRID)
    assert maps.shape == (2, 4, 5)
    # the class token is gone: only the patch's mass remains, exactly where it was put
    assert maps[0].sum() == pytest.approx(0.3) and maps[0, ROW, COL] == pytest.approx(0.3)
    image = Image.new("RGB", (GRID[1] * PATCH, GRID[0] * PATCH), (90, 90, 90))  # W=50, H=40
    config = AttentionMapConfig()
    drawn = plot_attention_grid(tmp_path / "grid.png", image, WordMaps(["a", "b"], maps, [False] * 2),
                                config)
    assert (tmp_path / "grid.png").is_file() and drawn.shape == (2, 40, 50)
    r, c = peak(drawn[0])
    assert ROW * PATCH <= r < (ROW + 1) * PATCH and COL * PATCH <= c < (COL + 1) * PATCH
    r, c = peak(drawn[1])  # bottom-left patch: bottom rows, left columns of the image
    assert 3 * PATCH <= r < 4 * PATCH and 0 <= c < PATCH
    # nearest upsampling: the whole patch square, and nothing else, holds the maximum
    blocky = upsample(maps, (40, 50), "nearest")[0]
    top = (blocky == blocky.max()).nonzero()
    assert top[:, 0].min() == ROW * PATCH and top[:, 0].max() == (ROW + 1) * PATCH - 1
    assert top[:, 1].min() == COL * PATCH and top[:, 1].max() == (COL + 1) * PATCH - 1


def test_patch_maps_refuse_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="1 prefix tokens \\+ a 5x4 patch grid"):
        patch_maps(torch.zeros(3, 20), 1, (5, 4))  # 20 tokens: the class token is not there


def test_layer_selection_and_reductions():
    blocks = [1, 3]  # a cross bridge in blocks 1 and 3 of a 4-block decoder
    assert select_layers("all", blocks, 4) == [0, 1]
    assert select_layers("last", blocks, 4) == [1]
    assert select_layers(3, blocks, 4) == [1] and select_layers(-1, blocks, 4) == [1]
    assert select_layers([3, 1], blocks, 4) == [0, 1] and select_layers([-1, 3], blocks, 4) == [1]
    with pytest.raises(ValueError, match=r"block\(s\) \[0\] have no attention over the image"):
        select_layers(0, blocks, 4)
    with pytest.raises(ValueError, match=r"visualize.layers \[4\] outside the decoder's 4 blocks"):
        select_layers([1, 4], blocks, 4)
    att = torch.zeros(1, 2, 2, 3)
    att[0, 0, 0] = torch.tensor([1.0, 0, 0])
    att[0, 0, 1] = torch.tensor([0, 3.0, 0])
    att[0, 1, 1] = torch.tensor([0, 0, 5.0])
    assert reduce_attention(att, [0], "mean", "mean").tolist() == [[0.5, 1.5, 0]]
    assert reduce_attention(att, [0], "max", "mean").tolist() == [[1, 3, 0]]
    assert reduce_attention(att, [0, 1], "sum", "sum").tolist() == [[1, 3, 5]]
    assert reduce_attention(att, [0, 1], "sum", "max").tolist() == [[1, 3, 5]]
    with pytest.raises(ValueError, match="head_reduce"):
        AttentionMapConfig(head_reduce="median")
    with pytest.raises(ValueError, match="layers"):
        AttentionMapConfig(layers="first")


def byte_vocab(folder):
    """A byte-level BPE in GPT-2's file format with no merges: every byte is a token, so words
    span several tokens and merging is exercised; the end token is the last id."""
    encoder = {s: i for i, s in enumerate(sorted(ByteLevel.alphabet()))}
    encoder[EOT] = len(encoder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n", encoding="utf-8")
    return Tokenizer.from_files(folder / "encoder.json", folder / "vocab.bpe")


def test_bpe_tokens_are_merged_into_words_and_the_end_token_is_last(tmp_path):
    tok = byte_vocab(tmp_path)
    tokens = tok.encode("a red box.") + [tok.eot_id]
    assert len(tokens) == 1 + 4 + 5 + 1  # "a", "Ġred" as 4 bytes, "Ġbox." as 5, end
    groups = group_tokens(tok, tokens, "mean")
    assert [g.label for g in groups] == ["a", "red", "box.", EOT]
    assert [g.positions for g in groups] == [[0], [1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]
    assert [g.is_end for g in groups] == [False, False, False, True]
    per_token = group_tokens(tok, tokens, "none")
    assert len(per_token) == len(tokens) and per_token[-1].label == EOT
    maps = torch.arange(len(tokens), dtype=torch.float32)[:, None, None].expand(-1, 2, 2)
    mean = merge_groups(maps, groups, "mean")[:, 0, 0].tolist()
    total = merge_groups(maps, groups, "sum")[:, 0, 0].tolist()
    assert mean == [0, 2.5, 7, 10] and total == [0, 10, 35, 10]


def test_encoder_view_maps_pixels_back_to_the_original():
    # a wide image; CLIP's transform: shorter side to 30, centre crop 30 x 30
    original = Image.new("RGB", (100, 60), (0, 0, 0))
    original.paste((255, 0, 0), (44, 24, 56, 36))  # a red square centred at (50, 30)
    preprocess = T.Compose([T.Resize(30), T.CenterCrop(30), T.ToTensor(),
                            T.Normalize((0.5,) * 3, (0.5,) * 3)])
    view = encoder_view(preprocess, original)
    assert view.image.size == (30, 30)
    assert view.to_original(0, 0) == pytest.approx((20, 0))
    assert view.to_original(15, 15) == pytest.approx((50, 30))
    px = np.asarray(view.image, dtype=np.float32)
    assert px[15, 15, 0] > 200 and px[15, 15, 1] < 60 and px[0, 0].max() < 30
    with pytest.raises(ValueError, match="RandomHorizontalFlip is not understood"):
        encoder_view(T.Compose([T.Resize(30), T.RandomHorizontalFlip()]), original)


def test_shape_words_are_checked_against_the_objects():
    vocab = shape_vocabulary({"square": ("square", "box"), "cross": ("cross", "plus sign")})
    assert vocab["boxes"] == "square" and vocab["plus"] == "cross" and "sign" not in vocab
    objects = [{"shape": "square", "colour": "red", "cx": 35.0, "cy": 15.0, "extent": 10.0},
               {"shape": "cross", "colour": "blue", "cx": 5.0, "cy": 35.0, "extent": 10.0}]
    maps = patch_maps(reduce_attention(forced_attention(), [0], "mean", "mean"), 1, GRID)
    drawn = upsample(maps, (40, 50))
    view = encoder_view(T.Compose([T.ToTensor()]), Image.new("RGB", (50, 40)))
    report = shape_words_report(["box", "cross"], drawn, view, GRID, vocab, objects)
    assert [e["patch"] for e in report] == [[ROW, COL], [3, 0]]
    assert report[0]["peak_on_named_shape"] and report[0]["most_attention_on_named_shape"]
    assert report[1]["peak_on_named_shape"] and report[1]["peak_object"].startswith("blue cross")
    wrong = shape_words_report(["cross", "box"], drawn, view, GRID, vocab, objects)
    assert not any(e["peak_on_named_shape"] for e in wrong)
    assert count_hits([{"shape_words": report}, {"shape_words": wrong}]) == {
        "shape_words": 4, "peak_on_named_shape": 2, "most_attention_on_named_shape": 2,
        "named_shape_in_image": 4}


# --- positional embeddings ----------------------------------------------------------------------

def tiny_clip(seed=1):
    torch.manual_seed(seed)
    return CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
                vision_patch_size=8, context_length=16, vocab_size=100, transformer_width=64,
                transformer_heads=1, transformer_layers=1).eval()


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip_tiny.pt"
    torch.save(tiny_clip().state_dict(), path)
    return path


def test_positional_similarity_of_clip_drops_the_class_position(clip_path, tmp_path):
    encoder = build_encoder(EncoderConfig(kind="clip", name=str(clip_path)))
    assert encoder.grid == (4, 4)
    with torch.no_grad():  # orthogonal positions, the class position equal to patch 5's
        pe = torch.zeros(17, 64)
        pe[1:, :16] = torch.eye(16)
        pe[0, 5] = 1
        encoder.visual.positional_embedding.copy_(pe)
    patches = patch_positional_embeddings(encoder)
    assert torch.equal(patches, pe[1:])
    sim = plot_similarity_grid(tmp_path / "pos.png", patches, encoder.grid)
    assert (tmp_path / "pos.png").is_file()
    assert torch.allclose(sim, torch.eye(16))
    for i in range(16):  # each small map peaks at its own position
        assert peak(sim[i].reshape(4, 4)) == (i // 4, i % 4)


def test_positional_embeddings_of_a_clip_resnet(tmp_path):
    """A ResNet CLIP's positions are its attention pool's, the pooled (mean) position dropped."""
    model = CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                 vision_patch_size=None, context_length=16, vocab_size=100, transformer_width=64,
                 transformer_heads=1, transformer_layers=1)
    torch.save(model.state_dict(), tmp_path / "rn.pt")
    encoder = build_encoder(EncoderConfig(kind="clip", name=str(tmp_path / "rn.pt")))
    patches = patch_positional_embeddings(encoder)
    assert encoder.grid == (2, 2)
    assert torch.equal(patches, model.visual.attnpool.positional_embedding.detach()[1:])


def test_positional_embeddings_of_a_timm_vit():
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              img_size=48, depth=1)
    holder = type("E", (), {})()  # an ImageEncoder-like holder of a timm model
    holder.model, holder.grid, holder.num_prefix_tokens = model, (3, 3), 1
    pe = patch_positional_embeddings(holder)
    assert torch.equal(pe, model.pos_embed[0, 1:].detach())
    sim = cosine_similarity_matrix(pe)
    assert sim.shape == (9, 9) and torch.allclose(sim.diagonal(), torch.ones(9), atol=1e-5)


# --- the visualize stage on tiny models ---------------------------------------------------------

def save_jpeg(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=95)


def make_pipeline(root, clip_path, bridge, peft, queries=0):
    """Everything the visualize stage reads, in miniature: a data root with p3 scenes and val
    images, a tiny GPT-2 in the course format, a released checkpoint, feature files, scores."""
    from demo import scenes
    data = root / "hw3_data"
    cfg = scenes.SceneConfig(image_size=32, seed=3)
    (root / "p3_objects.json").write_text(json.dumps(scenes.p3_objects(cfg)))
    for i, name in enumerate(scenes.P3_NAMES):
        save_jpeg(scenes.render_scene(cfg, scenes.rng_for(cfg.seed, "p3", i)).image,
                  data / "p3_data" / "images" / f"{name}.jpg")
    rng = np.random.default_rng(0)
    val_names = [f"v{i}" for i in range(3)]
    for n in val_names:
        save_jpeg(Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
                  data / "p2_data" / "images" / "val" / f"{n}.jpg")
    tok = byte_vocab(data / "p2_data")
    torch.manual_seed(0)
    gpt = GPT2(GPT2Config(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        # Captions of a few words from a handful of letters and the space: the final norm's bias
        # points along d, and only those tokens' (tied) output embeddings share d.
        d = torch.nn.functional.normalize(torch.randn(32), dim=0)
        gpt.ln_f.weight.mul_(0.5)
        gpt.ln_f.bias.copy_(3 * d)
        keep = [tok.encode(ch)[0] for ch in " abdeorx"] + [tok.eot_id]
        gpt.wte.weight[keep] += 2 * d
        gpt.wte.weight[tok.eot_id] -= 0.5 * d
    torch.save(course_state_dict(gpt), data / "p2_data" / "decoder_model.bin")
    enc_cfg = {"kind": "clip", "name": str(clip_path)}
    encoder = build_encoder(enc_cfg)
    eid = encoder_id(EncoderConfig(**enc_cfg))
    for split, folder in (("p3", data / "p3_data" / "images"),
                          ("val", data / "p2_data" / "images" / "val")):
        write_features(root / "features" / f"{split}.h5", encoder, sorted(folder.glob("*.jpg")), eid)
    decoder = load_course_checkpoint(data / "p2_data" / "decoder_model.bin", n_head=2)
    config = CaptionerConfig(decoder=decoder.config, visual_width=encoder.width,
                             visual_tokens=encoder.num_tokens,
                             bridge=BridgeConfig.of(bridge, queries=queries, query_width=16),
                             peft=PeftConfig.of(peft, **({"rank": 2} if peft == "lora" else {"length": 3})),
                             encoder_id=eid, tokenizer_id=tok.identity)
    model = Captioner(config, decoder)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    release = root / "release"
    release.mkdir()
    save_trainable(model, release / "captioner.safetensors")
    for f in ("encoder.json", "vocab.bpe"):
        (release / f).write_bytes((data / "p2_data" / f).read_bytes())
    decode = {"method": "sample", "seed": 0, "max_new_tokens": 10, "batch_size": 4}
    (release / "selected.json").write_text(json.dumps(
        {"variant": "v", "scores": {}, "encoder": enc_cfg, "decode": decode, "decoder_heads": 2}))
    scores = {n: {"caption": "x", "clipscore": s} for n, s in zip(val_names, (0.5, 0.9, 0.1))}
    (root / "predictions" / "v").mkdir(parents=True)
    (root / "predictions" / "v" / "val_scores.json").write_text(json.dumps(scores))
    params = {"world": {"data_root": str(data), "decoder": str(data / "p2_data" / "decoder_model.bin"),
                        "decoder_heads": 2, "encoder_json": str(data / "p2_data" / "encoder.json"),
                        "vocab_bpe": str(data / "p2_data" / "vocab.bpe"), "clip": str(clip_path)},
              "visualize": {"layers": "all", "head_reduce": "mean", "layer_reduce": "mean",
                            "word_merge": "mean", "decode": {"max_new_tokens": 9},
                            "objects": "p3_objects.json"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return model, tok


@pytest.mark.parametrize("bridge,peft,queries", [("cross", "lora", 0), ("visual_prefix", "prefix_tuning", 0),
                                                 ("gated_cross", "lora", 3), ("visual_prefix", "prefix_tuning", 3)])
def test_visualize_stage_draws_every_word_for_both_bridge_kinds(tmp_path, clip_path, bridge, peft,
                                                                queries, monkeypatch):
    """Learned queries too: their attention is carried onto the image's patches."""
    from stages import visualize
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    model, tok = make_pipeline(tmp_path, clip_path, bridge, peft, queries)
    visualize.main([])
    out = tmp_path / "figures" / "attention"
    summary = json.loads((out / "summary.json").read_text())
    names = ["bike", "girl", "sheep", "ski", "umbrella"]
    assert [e["name"] for e in summary["p3"]] == names
    for n in names + ["val_best", "val_worst"]:
        assert (out / f"{n}.png").stat().st_size > 1000
    assert summary["val"]["best"]["name"] == "v1" and summary["val"]["worst"]["name"] == "v2"
    assert summary["ground_truth_objects"] and summary["shape_word_hits"] is not None
    assert (out / "layers_bike.png").stat().st_size > 1000   # one row per decoder layer
    assert summary["p3"][0]["layers_figure"] == "figures/attention/layers_bike.png"
    assert all({"repeated_words", "names_an_object"} <= e.keys() for e in summary["p3"])
    for e in summary["p3"]:
        # one panel per whitespace word of the caption, then the end token if generated
        words = [w["word"] for w in e["words"]]
        assert words[:len(e["caption"].split())] == e["caption"].split()
        assert len(words) == len(e["caption"].split()) + e["ended"]
        for w in e["words"]:
            assert 0 <= w["patch"][0] < 4 and 0 <= w["patch"][1] < 4
    assert (tmp_path / "figures" / "pos_embed_similarity.png").is_file()
    # the settings that made these captions: the release's, with visualize.decode on top
    assert summary["decode"]["max_new_tokens"] == 9
    assert all(len(e["words"]) <= 9 for e in summary["p3"])


def test_visualize_names_a_corrupt_scores_file_and_writes_nothing(tmp_path, clip_path, monkeypatch):
    from common.errors import InputError
    from stages import visualize
    monkeypatch.chdir(tmp_path)
    make_pipeline(tmp_path, clip_path, "cross", "lora")
    (tmp_path / "predictions" / "v" / "val_scores.json").write_text('{"v1": ')
    with pytest.raises(InputError, match=r"val_scores\.json: not valid JSON"):
        visualize.main([])
    assert not (tmp_path / "figures").exists()


# --- the report -----------------------------------------------------------------------------------

def fabricate_outputs(root, cider=0.8123):
    def write(rel, obj):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj))

    variants = {"lora": {"bridge": "gated_cross", "peft": "lora"},
                "prefix_bridge": {"bridge": "visual_prefix", "peft": "prompt_tuning"}}
    for i, v in enumerate(variants):
        write(f"metrics/{v}.json", {"cider": cider - i / 10, "clipscore": 0.6543,
                                    "bleu4": 0.2, "meteor": 0.21, "rougeL": 0.45,
                                    "cider_blind": 0.1111, "n_images": 500})
        write(f"live/train/{v}/metrics.json", {"best_epoch": 3, "best_val_cider": 0.79,
                                               "trainable_params": 123456 + i, "step": 40})
        write(f"logs/train/{v}.json", {"train_seconds": 600.0, "device": "cpu"})
        curves = root / "live" / "train" / v / "plots" / "metrics"
        for rel, column, rows in (
                ("train/loss.tsv", "loss", [(s, 3 - s / 20) for s in range(10, 41, 10)]),
                ("train/lr.tsv", "lr", [(s, 0.01) for s in range(10, 41, 10)]),
                ("val/loss.tsv", "loss", [(10 * e, 3.1 - e / 3) for e in range(1, 5)]),
                ("val/cider.tsv", "cider", [(10 * e, 0.2 * e) for e in range(1, 5)])):
            (curves / rel).parent.mkdir(parents=True, exist_ok=True)
            (curves / rel).write_text("\n".join([f"step\t{column}"] + [f"{s}\t{x}" for s, x in rows]) + "\n")
    write("metrics/zeroshot.json", {"accuracy": {"a_photo_of": 0.4567, "ensemble": 0.5012},
                                    "predict_with_accuracy": 0.5012, "n_images": 480})
    write("metrics/zeroshot_classes.json", {"templates": {"a_photo_of": "a photo of a {}."},
                                            "predict_with": "ensemble"})
    write("metrics/demo_gpt2.json", {"val_loss": 1.2345, "epochs": 3})
    (root / "figures" / "zeroshot").mkdir(parents=True)
    fig = Image.new("RGB", (8, 8))
    for name in ("template_accuracy.png", "top5_success_0.png", "top5_failure_0.png"):
        fig.save(root / "figures" / "zeroshot" / name)
    (root / "figures" / "attention").mkdir(parents=True)
    fig.save(root / "figures" / "attention" / "bike.png")
    write("figures/attention/summary.json", {
        "variant": "lora", "maps": {"layers": "all", "head_reduce": "mean"},
        "p3": [{"name": "bike", "caption": "a red box", "figure": "figures/attention/bike.png",
                "shape_words": [{"word": "box", "patch": [2, 3], "peak_object": "red square at (40, 30)",
                                 "most_attended_object": "red square at (40, 30)",
                                 "peak_on_named_shape": True}]}],
        "val": {}, "shape_word_hits": {"shape_words": 7, "peak_on_named_shape": 5,
                                       "most_attention_on_named_shape": 6, "named_shape_in_image": 7}})
    params = {"world": {"data_root": "data/demo/hw3_data"}, "variants": variants,
              "peft": {"lora": {"rank": 8}},
              "report": {"note": "These numbers are not comparable with the course's.",
                         "world_metrics": ["metrics/demo_gpt2.json"]}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def test_report_renders_every_section_from_the_pipeline_outputs(tmp_path, monkeypatch):
    from stages import report
    monkeypatch.chdir(tmp_path)
    fabricate_outputs(tmp_path)
    report.main([])
    page = (tmp_path / "report" / "README.md").read_text()
    for text in ("0.812", "0.712", "0.654", "0.111", "123,456", "10.0 min", "0.4567", "0.5012",
                 "`a photo of a {}.`", "a red box", "not comparable", "1.2345",
                 "dvc exp run -S peft.lora.rank=16", "for 5, the object", "rank: 8",
                 "| bike | box | (2, 3) | red square at (40, 30) |"):
        assert text in page, text
    for rel in ("figures/training_curves.png", "figures/variant_scores.png",
                "figures/zeroshot/top5_failure_0.png", "figures/attention/bike.png"):
        assert (tmp_path / "report" / rel).is_file() and f"]({rel})" in page
    # every variant's curves in one table per kind, for `dvc plots`; the summary figures as images
    val = json.loads((tmp_path / "plots" / "variants" / "val.json").read_text())
    assert {r["variant"] for r in val} == {"lora", "prefix_bridge"} and len(val) == 8
    assert val[0] == {"step": 10, "variant": "lora", "val_loss": 3.1 - 1 / 3, "val_cider": 0.2}
    train_rows = json.loads((tmp_path / "plots" / "variants" / "train.json").read_text())
    assert train_rows[-1] == {"step": 40, "variant": "prefix_bridge", "train_loss": 1.0, "lr": 0.01}
    assert sorted(p.name for p in (tmp_path / "plots" / "report").iterdir()) == [
        "training_curves.png", "variant_scores.png"]   # no gated variant here: no gates.png
    assert "### Gates" not in page
    # new numbers replace the old ones: nothing stale survives a re-run
    fabricate_outputs_again = json.loads((tmp_path / "metrics" / "lora.json").read_text())
    fabricate_outputs_again["cider"] = 0.9321
    (tmp_path / "metrics" / "lora.json").write_text(json.dumps(fabricate_outputs_again))
    report.main([])
    page = (tmp_path / "report" / "README.md").read_text()
    assert "0.932" in page and "0.812" not in page


def test_report_plots_the_gates_of_a_gated_variant(tmp_path, monkeypatch):
    from reporting.report import read_gates
    from stages import report
    monkeypatch.chdir(tmp_path)
    fabricate_outputs(tmp_path)
    gates = tmp_path / "live" / "train" / "lora" / "plots" / "metrics" / "gates"
    gates.mkdir()
    for block in (0, 1, 10):   # numeric block order, not the files' (0, 1, 10, 2 ...)
        (gates / f"block{block}.tsv").write_text(
            f"step\tblock{block}\n" + "".join(f"{10 * e}\t{0.01 * e * block}\n" for e in range(1, 5)))
    assert list(read_gates(gates)) == [0, 1, 10] and read_gates(gates)[10][-1] == (40, 0.4)
    report.main([])
    page = (tmp_path / "report" / "README.md").read_text()
    assert "### Gates" in page and "](figures/gates.png)" in page
    assert (tmp_path / "report" / "figures" / "gates.png").is_file()
    assert sorted(p.name for p in (tmp_path / "plots" / "report").iterdir()) == [
        "gates.png", "training_curves.png", "variant_scores.png"]


def test_report_names_a_missing_metrics_file(tmp_path, monkeypatch):
    from stages import report
    monkeypatch.chdir(tmp_path)
    fabricate_outputs(tmp_path)
    (tmp_path / "live" / "train" / "prefix_bridge" / "metrics.json").unlink()
    with pytest.raises(ReportError, match="live/train/prefix_bridge/metrics.json: missing"):
        report.main([])   # which run_stage reports as one line
    assert not (tmp_path / "report").exists()


def test_caption_flags():
    from reporting.attention_summary import caption_flags
    vocab = shape_vocabulary({"square": ("square", "box"), "star": ("star",)})
    objects = [{"shape": "square", "colour": "red", "cx": 1, "cy": 1, "extent": 2}]
    assert caption_flags("a red box on a blue star", vocab, objects) == {
        "repeated_words": [], "names_an_object": True}
    assert caption_flags("a red red star star.", vocab, objects) == {
        "repeated_words": ["red", "star"], "names_an_object": False}
    assert caption_flags("a red box and a red box", vocab) == {"repeated_words": ["a red", "red box"]}
