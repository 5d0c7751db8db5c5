"""common/imageio.py on hostile inputs (issue 8)."""
import pickle

import pytest
import torch
from PIL import Image

from common.imageio import (ImageFolderError, ImageReadError, image_loader, iter_rgb, list_images,
                            load_rgb, scan_folder)
from tests.hostile_images import IGNORED, READABLE, UNREADABLE, make_hostile_folder


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return make_hostile_folder(tmp_path_factory.mktemp("hostile"))


def test_list_images_top_level_sorted_case_insensitive(hostile, capsys):
    names = [p.name for p in list_images(hostile, stream=None)]
    assert names == sorted(list(READABLE) + UNREADABLE)
    scan = scan_folder(hostile)
    assert sorted(p.name for p in scan.ignored) == sorted(IGNORED)
    list_images(hostile, stream=__import__("sys").stderr)
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "nested/" in note[0] and "notes.txt" in note[0]


@pytest.mark.parametrize("name", sorted(READABLE))
def test_readable_become_rgb(hostile, name):
    img = load_rgb(hostile / name)
    assert img.mode == "RGB"
    assert img.size == READABLE[name]


def test_conversions_are_faithful(hostile):
    assert load_rgb(hostile / "gray.png").getpixel((3, 3)) == (100, 100, 100)
    # 16-bit mid-grey is rescaled, not clipped to white
    assert load_rgb(hostile / "sixteen_bit.png").getpixel((3, 3)) == (128, 128, 128)
    # transparency is composited on white; opaque pixels keep their colour
    rgba = load_rgb(hostile / "rgba.png")
    assert rgba.getpixel((2, 2)) == (255, 255, 255) and rgba.getpixel((20, 2)) == (255, 0, 0)
    pt = load_rgb(hostile / "palette_transparent.png")
    assert pt.getpixel((2, 2)) == (255, 255, 255) and pt.getpixel((20, 2)) == (0, 0, 255)
    r, g, b = load_rgb(hostile / "cmyk.jpg").getpixel((5, 5))
    assert r > 200 and g < 50 and b < 50
    # EXIF orientation 6: the red top-left quarter of the stored image ends up top-right
    rot = load_rgb(hostile / "exif_rotated.jpg")
    r, g, b = rot.getpixel((rot.width - 2, 1))
    assert r > 200 and b < 60
    r, g, b = rot.getpixel((1, 1))
    assert b > 200 and r < 60
    # the same pixels as a plain open for an ordinary file
    assert list(load_rgb(hostile / "a_rgb.png").getdata()) == list(
        Image.open(hostile / "a_rgb.png").convert("RGB").getdata())


@pytest.mark.parametrize("mode,values,grey", [
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),               # float image in [0, 1]
    ("F", [0.0, 100.0, 255.0], [0, 100, 255]),           # float image in [0, 255]
    ("I", [0, 32896, 65535], [0, 128, 255]),             # 16-bit values in a 32-bit image
    ("I", [0, 500000, 1000000], [0, 128, 255]),          # wider values: rescaled to their maximum
])
def test_wide_greyscale_is_rescaled(tmp_path, mode, values, grey):
    import numpy as np
    arr = np.array([values], dtype=np.float32 if mode == "F" else np.int32)
    path = tmp_path / "wide.tif"
    Image.fromarray(arr, mode=mode).save(path)
    img = load_rgb(path)
    assert [img.getpixel((x, 0)) for x in range(3)] == [(g, g, g) for g in grey]


@pytest.mark.parametrize("name,problem", [("truncated.jpg", "truncated"), ("zero_bytes.jpg", "0 bytes"),
                                          ("text_named.jpg", "not an image"), ("bad.PNG", "truncated")])
def test_unreadable_raise_naming_file(hostile, name, problem):
    with pytest.raises(ImageReadError) as e:
        load_rgb(hostile / name)
    assert name in str(e.value) and problem in str(e.value)
    assert e.value.path == hostile / name


def test_missing_file():
    with pytest.raises(ImageReadError, match="file not found"):
        load_rgb("/nonexistent/x.png")


def test_iter_rgb_one_line_per_unreadable(hostile, capsys):
    skipped = []
    got = [p.name for p, img in iter_rgb(list_images(hostile), skipped=skipped)]
    assert got == sorted(READABLE)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(UNREADABLE)
    for name in UNREADABLE:
        assert sum(name in line for line in err) == 1
    assert sorted(e.path.name for e in skipped) == sorted(UNREADABLE)


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloader_skips_bad_files(hostile, workers):
    paths = list_images(hostile)
    transform = lambda im: torch.tensor(im.resize((8, 8)).getpixel((0, 0)), dtype=torch.float32)
    seen, errors = [], []
    for batch in image_loader(paths, transform, batch_size=4, num_workers=workers):
        if batch.pixels is not None:
            assert batch.pixels.shape == (len(batch.indices), 3)
        seen.extend(batch.indices)
        errors.extend(batch.errors)
    assert [paths[i].name for i in seen] == sorted(READABLE)
    assert sorted(e.path.name for e in errors) == sorted(UNREADABLE)


def test_error_pickles():
    e = pickle.loads(pickle.dumps(ImageReadError("/a/b.png", "bad")))
    assert str(e) == "/a/b.png: bad" and e.problem == "bad"


def test_folder_errors(tmp_path):
    with pytest.raises(ImageFolderError, match="does not exist") as e:
        list_images(tmp_path / "missing")
    assert "missing" in str(e.value)
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(ImageFolderError, match="not a folder"):
        list_images(tmp_path / "f.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ImageFolderError, match="no image files") as e:
        list_images(empty)
    assert str(empty) in str(e.value)
