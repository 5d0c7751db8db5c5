"""A folder of hostile image inputs (issue 8), shared by the hw3_1 / hw3_2 / imageio tests."""
import io
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (width, height) after loading (EXIF orientation applied)
READABLE = {
    "a_rgb.png": (24, 16),
    "Upper Case.JPG": (24, 16),
    "quote's \"double\".png": (24, 16),
    "naïve 日本語.png": (24, 16),
    "gray.png": (24, 16),
    "rgba.png": (24, 16),
    "palette.png": (24, 16),
    "palette_transparent.png": (24, 16),
    "sixteen_bit.png": (24, 16),
    "cmyk.jpg": (24, 16),
    "exif_rotated.jpg": (16, 24),   # stored 24x16 with orientation 6 (rotate 90 degrees)
    "bitmap.BMP": (24, 16),
    "web.WebP": (24, 16),
}
UNREADABLE = ["truncated.jpg", "zero_bytes.jpg", "text_named.jpg", "bad.PNG", "broken_link.png"]
IGNORED = ["notes.txt", ".hidden.png", "nested"]   # not images by rule; never read


def _noise(w=24, h=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_hostile_folder(folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_noise())
    rgb.save(folder / "a_rgb.png")
    rgb.save(folder / "Upper Case.JPG", format="JPEG")
    rgb.save(folder / "quote's \"double\".png")
    rgb.save(folder / "naïve 日本語.png")
    rgb.save(folder / "bitmap.BMP", format="BMP")
    rgb.save(folder / "web.WebP", format="WEBP")
    Image.new("L", (24, 16), 100).save(folder / "gray.png")
    rgba = Image.new("RGBA", (24, 16), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 12, 16))               # left half fully transparent black
    rgba.save(folder / "rgba.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    pt = Image.new("P", (24, 16), 1)
    pt.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pt.paste(0, (0, 0, 12, 16))
    pt.save(folder / "palette_transparent.png", transparency=0)   # index 0 (black) transparent
    Image.fromarray(np.full((16, 24), 32768, dtype=np.uint16)).save(folder / "sixteen_bit.png")
    Image.new("CMYK", (24, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg", format="JPEG")  # red
    rot = Image.new("RGB", (24, 16), (0, 0, 255))
    rot.paste((255, 0, 0), (0, 0, 12, 8))                  # red top-left quarter
    exif = Image.Exif()
    exif[0x0112] = 6
    rot.save(folder / "exif_rotated.jpg", format="JPEG", exif=exif, quality=95)

    buf = io.BytesIO()
    Image.fromarray(_noise(256, 256, seed=1)).save(buf, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "text_named.jpg").write_text("this is not an image\n")
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    (folder / "bad.PNG").write_bytes(png.getvalue()[:60])  # header only: truncated PNG
    (folder / "broken_link.png").symlink_to(folder / "moved_away.png")   # a dangling symlink

    (folder / "notes.txt").write_text("not an image")
    rgb.save(folder / ".hidden.png")
    (folder / "nested").mkdir(exist_ok=True)
    rgb.save(folder / "nested" / "inner.png")
    return folder
