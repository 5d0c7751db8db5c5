"""Frozen image encoders: tiny timm ViTs and a tiny openai CLIP, random weights saved in the real
file formats and reloaded; nothing downloaded."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"   # before timm/huggingface_hub read it: never touch the network

import pytest
import safetensors.torch
import timm
import torch
from common.errors import ParamsError
from common.params import from_section
from clip.model import CLIP
from PIL import Image

from evaluation.encoders import EncoderConfig, EncoderError, build_encoder, encoder_id

TIMM_NAME = "vit_tiny_patch16_224"
TIMM_KW = dict(img_size=32, depth=2)          # 2 x 2 patches of 16, width 192


def timm_cfg(weights):
    return EncoderConfig(kind="timm", name=TIMM_NAME, weights=str(weights), image_size=32,
                         model_kwargs={"depth": 2})


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    d = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, **TIMM_KW).eval()
    torch.save(model.state_dict(), d / "vit.pth")
    safetensors.torch.save_file(model.state_dict(), str(d / "vit.safetensors"))
    return model, d


def tiny_clip():
    # CLIP infers heads as width // 64, so widths are multiples of 64.
    return CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                vision_patch_size=8, context_length=16, vocab_size=100, transformer_width=64,
                transformer_heads=1, transformer_layers=1).eval()


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    torch.manual_seed(1)
    model = tiny_clip()
    path = tmp_path_factory.mktemp("clip") / "clip_tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("fname", ["vit.pth", "vit.safetensors"])
def test_timm_reload_gives_identical_tokens(tiny_timm, fname):
    model, d = tiny_timm
    enc = build_encoder(timm_cfg(d / fname))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(x)
        tokens = enc(x)
    assert enc.grid == (2, 2) and enc.num_prefix_tokens == 1
    assert enc.num_tokens == 1 + 2 * 2 == tokens.shape[1]
    assert tokens.shape == (3, enc.num_tokens, enc.width) and enc.width == 192
    assert torch.equal(tokens, ref)
    # timm's own local-file path (pretrained_cfg_overlay file=) loads the same weights
    t2 = timm.create_model(TIMM_NAME, pretrained=True, num_classes=0, **TIMM_KW,
                           pretrained_cfg_overlay=dict(file=str(d / fname), custom_load=False)).eval()
    with torch.no_grad():
        assert torch.equal(t2.forward_features(x), tokens)


def test_timm_frozen_eval_and_preprocess(tiny_timm):
    _, d = tiny_timm
    enc = build_encoder(timm_cfg(d / "vit.pth"))
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    parent = torch.nn.Sequential(enc).train()    # a parent's train() must not unfreeze it
    assert not enc.training and not enc.model.training
    img = Image.new("RGB", (50, 37), (200, 30, 10))
    x = enc.preprocess(img)
    assert x.shape == (3, 32, 32)
    assert parent(x[None]).shape == (1, 5, 192)
    with pytest.raises(EncoderError, match="expected"):
        enc(torch.randn(1, 3, 48, 48))


def test_timm_weights_with_missing_key_is_an_error(tiny_timm, tmp_path):
    model, _ = tiny_timm
    sd = model.state_dict()
    del sd["blocks.1.mlp.fc2.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(EncoderError, match=r"broken\.pth.*missing keys: blocks\.1\.mlp\.fc2\.weight"):
        build_encoder(timm_cfg(tmp_path / "broken.pth"))
    with pytest.raises(EncoderError, match="not found"):
        build_encoder(timm_cfg(tmp_path / "absent.pth"))


def test_unusable_clip_file_is_an_encoder_error(clip_file, tmp_path):
    _, clip_file = clip_file
    """The error every caller (extract, hw3_2.sh, visualize) reports as one line naming the file."""
    (tmp_path / "cut.pt").write_bytes(clip_file.read_bytes()[:1000])
    with pytest.raises(EncoderError, match=r"cut\.pt"):
        build_encoder(EncoderConfig(kind="clip", name=str(tmp_path / "cut.pt")))
    sd = torch.load(clip_file, weights_only=True)
    del sd["visual.proj"]
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(EncoderError, match=r"short\.pt"):
        build_encoder(EncoderConfig(kind="clip", name=str(tmp_path / "short.pt")))


def test_clip_tokens_match_the_package(clip_file):
    model, path = clip_file
    enc = build_encoder(EncoderConfig(kind="clip", name=str(path)))
    assert enc.grid == (4, 4) and enc.num_tokens == 17 and enc.width == 64
    assert all(not p.requires_grad for p in enc.parameters()) and not enc.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(x)
        ref = model.encode_image(x)
    assert tokens.shape == (2, 17, 64)
    # where they overlap (the class token), the package's own forward agrees
    torch.testing.assert_close(tokens[:, 0] @ enc.visual.proj, ref, rtol=0, atol=1e-6)
    # patch tokens are real, distinct outputs, not copies of the class token
    assert not torch.allclose(tokens[:, 1], tokens[:, 0])
    pixels = enc.preprocess(Image.new("RGB", (40, 60), (10, 120, 240)))
    assert pixels.shape == (3, 32, 32)
    with pytest.raises(EncoderError, match="expected images"):
        enc(torch.randn(1, 3, 64, 64))


def test_precision_runs_under_autocast_and_is_part_of_the_id(clip_file):
    model, path = clip_file
    full = build_encoder(EncoderConfig(kind="clip", name=str(path)))
    half = build_encoder(EncoderConfig(kind="clip", name=str(path), precision="bf16"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = full(x), half(x)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert not torch.equal(a, b)                       # bf16 products: other numbers...
    torch.testing.assert_close(b, a, atol=0.1, rtol=0.05)   # ...close to the fp32 ones
    ids = {encoder_id(EncoderConfig(kind="clip", name=str(path), precision=p)) for p in ("fp32", "fp16", "bf16")}
    assert len(ids) == 3 and "precision" not in encoder_id(EncoderConfig(kind="clip", name=str(path)))
    with pytest.raises(EncoderError, match="precision must be one of"):
        EncoderConfig(kind="clip", name="ViT-B/32", precision="fp8")


def test_clip_resnet_tokens(tmp_path):
    """A ModifiedResNet CLIP: token 0 is encode_image; token 1 + r * g + c is position (r, c) of the
    attention pool's input through its value and output projections."""
    torch.manual_seed(2)
    model = CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                 vision_patch_size=None, context_length=16, vocab_size=100, transformer_width=64,
                 transformer_heads=1, transformer_layers=1)
    for m in model.visual.modules():   # non-trivial BatchNorm statistics, as a trained tower has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "rn.pt")
    enc = build_encoder(EncoderConfig(kind="clip", name=str(tmp_path / "rn.pt")))
    assert enc.grid == (2, 2) and enc.num_tokens == 5 and enc.width == 32
    assert enc.num_prefix_tokens == 1 and not enc.training
    grid_in = {}
    model.visual.attnpool.register_forward_pre_hook(lambda m, args: grid_in.update(x=args[0]))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        tokens = enc(x)
        ref = model.encode_image(x)
        pool = model.visual.attnpool
        r, c = 1, 0
        position = grid_in["x"][:, :, r, c] + pool.positional_embedding[1 + r * 2 + c]
        expected = pool.c_proj(pool.v_proj(position))
    assert tokens.shape == (3, 5, 32)
    torch.testing.assert_close(tokens[:, 0], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1 + r * 2 + c], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(tokens[:, 1], tokens[:, 2])


def test_clip_tower_equals_timm_quickgelu_clip_vit(clip_file):
    """The same CLIP weights through timm's CLIP ViT (its filter converts openai's keys) give the
    same tokens: both kinds return all tokens after the final norm, width-D."""
    _, path = clip_file
    enc = build_encoder(EncoderConfig(kind="clip", name=str(path)))
    tenc = build_encoder(EncoderConfig(
        kind="timm", name="vit_base_patch32_clip_quickgelu_224", weights=str(path), image_size=32,
        model_kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=1)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tenc(x), enc(x), rtol=1e-5, atol=1e-5)


def test_encoder_id_is_content_based(tiny_timm, clip_file, tmp_path):
    _, d = tiny_timm
    a = encoder_id(timm_cfg(d / "vit.pth"))
    assert a == encoder_id(timm_cfg(d / "vit.pth"))
    (tmp_path / "copy.pth").write_bytes((d / "vit.pth").read_bytes())
    assert encoder_id(timm_cfg(tmp_path / "copy.pth")) == a            # same bytes, same id
    assert encoder_id(timm_cfg(d / "vit.safetensors")) != a            # other bytes
    other = EncoderConfig(kind="timm", name=TIMM_NAME, weights=str(d / "vit.pth"), image_size=64,
                          model_kwargs={"depth": 2})
    assert encoder_id(other) != a
    _, cpath = clip_file
    cid = encoder_id(EncoderConfig(kind="clip", name=str(cpath)))
    assert '"kind":"clip"' in cid and "sha256" in cid
    (tmp_path / "renamed.pt").write_bytes(cpath.read_bytes())
    assert encoder_id(EncoderConfig(kind="clip", name=str(tmp_path / "renamed.pt"))) == cid
    assert encoder_id(EncoderConfig(kind="clip", name="ViT-B/32")) == '{"kind":"clip","name":"ViT-B/32"}'


def test_config_errors():
    with pytest.raises(EncoderError, match="kind"):
        EncoderConfig(kind="resnet", name="x")
    with pytest.raises(ParamsError, match="unknown parameter.*weight"):
        from_section(EncoderConfig, {"kind": "timm", "name": "x", "weight": "typo.pth"}, "encoder config")
    with pytest.raises(EncoderError, match="timm options"):
        EncoderConfig(kind="clip", name="ViT-B/32", weights="w.pth")


def test_penultimate_layer_and_no_class_token_as_llava(tiny_timm, clip_file, tmp_path):
    """layer "penultimate": the second-to-last block's output, no final norm (the same model with
    its last block and final norm removed gives it); class_token False: the patches alone. Both
    change the encoder id, the defaults leave it as it was."""
    import copy
    import dataclasses
    _, d = tiny_timm
    _, path = clip_file
    x = torch.randn(2, 3, 32, 32)
    for cfg in (timm_cfg(d / "vit.pth"), EncoderConfig(kind="clip", name=str(path))):
        full = build_encoder(cfg)
        pen = build_encoder(dataclasses.replace(cfg, layer="penultimate"))
        patches = build_encoder(dataclasses.replace(cfg, class_token=False))
        both = build_encoder(dataclasses.replace(cfg, layer="penultimate", class_token=False))
        cut = copy.deepcopy(full)
        if cfg.kind == "timm":
            cut.model.blocks[-1], cut.model.norm = torch.nn.Identity(), torch.nn.Identity()
        else:
            cut.visual.transformer.resblocks[-1] = torch.nn.Identity()
            cut.visual.ln_post = torch.nn.Identity()
        with torch.no_grad():
            tokens, penultimate = full(x), pen(x)
            torch.testing.assert_close(penultimate, cut(x), rtol=0, atol=1e-6)
            assert not torch.allclose(penultimate, tokens, atol=1e-3)
            assert torch.equal(patches(x), tokens[:, 1:]) and torch.equal(both(x), penultimate[:, 1:])
        assert (patches.num_tokens, patches.num_prefix_tokens, patches.grid) == (full.num_tokens - 1, 0, full.grid)
        ids = {encoder_id(c) for c in (cfg, dataclasses.replace(cfg, layer="penultimate"),
                                       dataclasses.replace(cfg, class_token=False))}
        assert len(ids) == 3 and "layer" not in encoder_id(cfg) and "class_token" not in encoder_id(cfg)
    # the same weights through timm's CLIP ViT and the clip package's agree on the penultimate too
    tenc = build_encoder(EncoderConfig(
        kind="timm", name="vit_base_patch32_clip_quickgelu_224", weights=str(path), image_size=32,
        model_kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=1), layer="penultimate"))
    with torch.no_grad():
        torch.testing.assert_close(tenc(x), pen(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(EncoderError, match="layer must be 'last' or 'penultimate'"):
        EncoderConfig(kind="clip", name="ViT-B/32", layer="first")


def test_a_resnet_clip_drops_its_pooled_token_but_has_no_penultimate_layer(tmp_path):
    """The demo CLIP is a ModifiedResNet: class_token False keeps its dense tokens alone; it has no
    stack of blocks to take a penultimate layer of."""
    torch.manual_seed(2)
    model = CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                 vision_patch_size=None, context_length=16, vocab_size=100, transformer_width=64,
                 transformer_heads=1, transformer_layers=1).eval()
    torch.save(model.state_dict(), tmp_path / "rn.pt")
    full = build_encoder(EncoderConfig(kind="clip", name=str(tmp_path / "rn.pt")))
    dense = build_encoder(EncoderConfig(kind="clip", name=str(tmp_path / "rn.pt"), class_token=False))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dense(x), full(x)[:, 1:]) and dense.num_tokens == 4
    with pytest.raises(EncoderError, match="penultimate' needs a ViT"):
        build_encoder(EncoderConfig(kind="clip", name=str(tmp_path / "rn.pt"), layer="penultimate"))
