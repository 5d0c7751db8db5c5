"""The HDF5 feature cache and the extract stage, on tiny random encoders and a few JPEGs."""
import hashlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import h5py
import numpy as np
import pytest
import torch
import yaml
from clip.model import CLIP
from PIL import Image

from evaluation.clip_io import load_clip
from evaluation.encoders import EncoderConfig, build_encoder, encoder_id
from common.imageio import ImageFolderError, image_names
from evaluation.features import (FeatureFile, FeatureFileError, read_embeddings,
                             write_clip_embeddings, write_features)
from common.imageio import ImageReadError, list_images, load_rgb
from common.errors import ParamsError
from tests.tiny_world import world_section


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def make_images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(24, 64, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im_{i:02d}.jpg")
    return list_images(folder)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
                 vision_patch_size=8, context_length=16, vocab_size=100, transformer_width=64,
                 transformer_heads=1, transformer_layers=1)
    path = tmp_path_factory.mktemp("clip") / "clip_tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def enc(clip_path):
    cfg = EncoderConfig(kind="clip", name=str(clip_path))
    return build_encoder(cfg), encoder_id(cfg)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("imgs"), 11)


def reference_tokens(encoder, paths):
    with torch.no_grad():
        return encoder(torch.stack([encoder.preprocess(load_rgb(p)) for p in paths])).half()


def test_write_is_byte_identical_and_round_trips(enc, images, tmp_path):
    encoder, eid = enc
    a, b = tmp_path / "a" / "val.h5", tmp_path / "b" / "val.h5"
    write_features(a, encoder, images, eid, batch_size=4)
    write_features(b, encoder, images, eid, batch_size=4)
    assert sha256(a) == sha256(b)
    assert os.listdir(tmp_path / "a") == ["val.h5"]          # no temp file left behind

    with h5py.File(a, "r") as f:
        ds = f["tokens"]
        assert ds.dtype == np.float16 and ds.shape == (11, 17, 64)
        assert ds.chunks == (1, 17, 64) and ds.compression is None
        assert f.attrs["encoder_id"] == eid and tuple(f.attrs["grid"]) == (4, 4)
        # no timestamps anywhere (two writes within one second would not show them)
        for obj in (f, f["tokens"], f["names"]):
            info = h5py.h5o.get_info(obj.id)
            assert (info.ctime, info.mtime) == (0, 0)

    ref = reference_tokens(encoder, images)
    ff = FeatureFile(a)
    assert len(ff) == 11 and ff.names == [p.stem for p in images] == image_names(images)
    assert ff.names[0] == "im_00" and ff.index_of("im_07") == 7
    assert (ff.num_tokens, ff.width, ff.grid, ff.num_prefix_tokens) == (17, 64, (4, 4), 1)
    assert ff[3].dtype == torch.float16 and torch.equal(ff[3], ref[3]) and torch.equal(ff[-1], ref[-1])
    assert torch.equal(ff.read_rows(range(11)), ref)
    assert torch.equal(ff.read_rows([9, 2, 2, 5]), ref[[9, 2, 2, 5]])   # any order, repeats
    ram = FeatureFile(a, in_memory=True)
    assert torch.equal(ram.read_rows([9, 2, 2, 5]), ref[[9, 2, 2, 5]]) and torch.equal(ram[4], ref[4])
    # the whole table: from the file, or in memory without a second copy (5.6 GB at real size)
    assert torch.equal(ff.all_rows(), ref) and torch.equal(ram.all_rows(), ref)
    assert ram.all_rows().data_ptr() == ram.all_rows().data_ptr()
    with pytest.raises(KeyError, match="im_99"):
        ff.index_of("im_99")
    with pytest.raises(IndexError):
        ff[11]
    ff.require_encoder(eid)
    with pytest.raises(FeatureFileError, match="re-run the extract stage"):
        ff.require_encoder('{"kind":"timm"}')
    ff.close()


class Boom(RuntimeError):
    pass


def test_interrupted_write_leaves_no_file(enc, images, tmp_path):
    encoder, eid = enc
    calls = []

    class Failing(torch.nn.Module):       # the real encoder, failing on its second batch
        def __getattr__(self, name):
            return getattr(encoder, name) if name not in ("forward",) else super().__getattr__(name)

        def forward(self, x):
            calls.append(len(x))
            if len(calls) == 2:
                raise Boom("killed mid-way")
            return encoder(x)

    out = tmp_path / "features" / "train.h5"
    with pytest.raises(Boom):
        write_features(out, Failing(), images, eid, batch_size=4)
    assert calls == [4, 4] and os.listdir(out.parent) == []

    write_features(out, encoder, images, eid, batch_size=4)     # a complete file ...
    before = sha256(out)
    calls.clear()
    with pytest.raises(Boom):
        write_features(out, Failing(), images, eid, batch_size=4)
    assert sha256(out) == before and os.listdir(out.parent) == ["train.h5"]   # ... stays whole


def test_unreadable_image_raises_or_is_skipped(enc, tmp_path):
    encoder, eid = enc
    paths = make_images(tmp_path / "imgs", 5)
    paths[2].write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match="im_02.jpg"):
        write_features(tmp_path / "x.h5", encoder, paths, eid, batch_size=2)
    assert not (tmp_path / "x.h5").exists()
    skipped = write_features(tmp_path / "x.h5", encoder, paths, eid, batch_size=2, skip_unreadable=True)
    assert skipped == [paths[2]]
    ff = FeatureFile(tmp_path / "x.h5")
    keep = [p for p in paths if p != paths[2]]
    assert ff.names == [p.stem for p in keep]
    assert torch.equal(ff.read_rows(range(4)), reference_tokens(encoder, keep))


def test_reader_of_compressed_file_takes_the_generic_path(enc, images, tmp_path):
    """Raw chunk copies are only valid for uncompressed one-row chunks; other layouts are read
    through h5py's selection and give the same rows."""
    encoder, eid = enc
    write_features(tmp_path / "a.h5", encoder, images, eid, batch_size=8)
    with h5py.File(tmp_path / "a.h5", "r") as src, h5py.File(tmp_path / "gz.h5", "w") as dst:
        dst.create_dataset("tokens", data=src["tokens"][()], chunks=(2, 17, 64), compression="gzip")
        src.copy("names", dst)
        dst.attrs.update(src.attrs)
    a, gz = FeatureFile(tmp_path / "a.h5"), FeatureFile(tmp_path / "gz.h5")
    assert a._raw_chunks and not gz._raw_chunks
    assert torch.equal(gz.read_rows([10, 0, 3, 3]), a.read_rows([10, 0, 3, 3]))
    assert torch.equal(gz[7], reference_tokens(encoder, images[7:8])[0])


def test_duplicate_stems_and_bad_files(tmp_path):
    with pytest.raises(ImageFolderError, match="share the name 'a'"):
        image_names([tmp_path / "a.jpg", tmp_path / "a.png"])
    with pytest.raises(FeatureFileError, match="not found"):
        FeatureFile(tmp_path / "nothing.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(FeatureFileError, match="junk.h5"):
        FeatureFile(tmp_path / "junk.h5")


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ff):
        self.ff = ff

    def __len__(self):
        return len(self.ff)

    def __getitem__(self, i):
        return self.ff[i]


def test_reader_in_dataloader_workers(enc, images, tmp_path):
    encoder, eid = enc
    write_features(tmp_path / "val.h5", encoder, images, eid, batch_size=8)
    ff = FeatureFile(tmp_path / "val.h5")
    first = ff[0]                         # the parent holds an open handle before workers start
    loader = torch.utils.data.DataLoader(_Rows(ff), batch_size=3, num_workers=2)
    rows = torch.cat(list(loader))
    assert torch.equal(rows, ff.read_rows(range(len(ff)))) and torch.equal(rows[0], first)


def test_clipscore_embeddings(clip_path, images, tmp_path):
    model, preprocess = load_clip(clip_path)
    mid = encoder_id(EncoderConfig(kind="clip", name=str(clip_path)))
    write_clip_embeddings(tmp_path / "clipscore_val.h5", model, preprocess, images, mid, batch_size=4)
    names, emb = read_embeddings(tmp_path / "clipscore_val.h5")
    with torch.no_grad():
        ref = model.encode_image(torch.stack([preprocess(load_rgb(p)) for p in images])).float()
    assert names == [p.stem for p in images]
    assert emb.dtype == np.float32 and emb.shape == (11, 32)
    np.testing.assert_allclose(emb, ref.numpy(), rtol=0, atol=1e-6)


def test_extract_stage(clip_path, tmp_path, monkeypatch):
    from stages import extract
    root = tmp_path / "hw3_data"
    make_images(root / "p2_data/images/train", 6, seed=1)
    val = make_images(root / "p2_data/images/val", 4, seed=2)
    make_images(root / "p3_data/images", 2, seed=3)
    params = {"world": world_section(root, clip_path), "extract": {
        "encoder": {"kind": "clip", "name": str(clip_path)},
        "splits": {"train": "p2_data/images/train", "val": "p2_data/images/val", "p3": "p3_data/images"},
        "clipscore_splits": ["val"],
        "batch_size": 4, "num_workers": 0, "device": "cpu",
    }}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    extract.main(["--params", str(tmp_path / "params.yaml")])
    out = tmp_path / "features"
    assert sorted(os.listdir(out)) == ["clipscore_val.h5", "p3.h5", "train.h5", "val.h5"]
    assert [len(FeatureFile(out / f"{s}.h5")) for s in ("train", "val", "p3")] == [6, 4, 2]
    assert read_embeddings(out / "clipscore_val.h5")[0] == [p.stem for p in val]
    hashes = {f: sha256(out / f) for f in os.listdir(out)}
    extract.main(["--params", str(tmp_path / "params.yaml")])
    assert hashes == {f: sha256(out / f) for f in os.listdir(out)}

    params["extract"]["clipscore_splits"] = ["test"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"extract.clipscore_splits \['test'\]: not in"):
        extract.main(["--params", str(tmp_path / "params.yaml")])
