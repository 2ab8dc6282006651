"""Input trees full of the quirks real datasets have, made from real photos.

Each generator returns the expected outcome per source path, so tests can
check that every file ends up in a shard (with the right fixes) or in the
rejects report (with the right reason).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stagewise.benchmarks.datasets import photo


@dataclass(frozen=True)
class Expect:
    fixes: tuple[str, ...] = ()  # for written files
    reject: str | None = None  # reason category for rejected files
    rotated: bool = False  # EXIF orientation swaps width and height


def _jpeg(im: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def quirk_files(seed: int) -> dict[str, tuple[bytes, Expect]]:
    """One file of each kind, keyed by a file name stem suffix."""
    im = photo(seed)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    png16 = io.BytesIO()
    Image.fromarray((np.asarray(im.convert("L"), dtype=np.uint16) * 257)).save(png16, "PNG")
    rgba = io.BytesIO()
    im.convert("RGBA").save(rgba, "PNG")
    pal = io.BytesIO()
    im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(pal, "PNG")
    png_as_jpeg = io.BytesIO()
    im.save(png_as_jpeg, "PNG")
    good = _jpeg(im)
    return {
        "ok": (good, Expect()),
        "cmyk": (_jpeg(im.convert("CMYK")), Expect(fixes=("cmyk",))),
        "gray": (_jpeg(im.convert("L")), Expect(fixes=("grayscale",))),
        "exif": (_jpeg(im, exif=exif.tobytes()), Expect(fixes=("exif_orientation",), rotated=True)),
        "progressive": (_jpeg(im, progressive=True), Expect(fixes=("progressive",))),
        "png16": (png16.getvalue(), Expect(fixes=("not_jpeg", "16bit"))),
        "rgba": (rgba.getvalue(), Expect(fixes=("not_jpeg", "alpha"))),
        "palette": (pal.getvalue(), Expect(fixes=("not_jpeg", "palette"))),
        "pngnamedjpeg": (png_as_jpeg.getvalue(), Expect(fixes=("not_jpeg",))),
        "truncated": (good[: len(good) // 2], Expect(reject="corrupt image")),
        "empty": (b"", Expect(reject="empty file")),
        "text": (b"this is not an image\n" * 20, Expect(reject="not an image")),
        "bomb": (_jpeg(Image.new("RGB", (400, 300), (10, 20, 30))), Expect(reject="decompression bomb")),
    }


BOMB_LIMIT = 100_000  # pixels: --max-pixels for trees from write_quirk_tree (the 400x300 "bomb" exceeds it)


def make_unreadable(path: Path) -> None:
    """A regular-looking input that cannot be read. Root ignores file modes, so
    as root it is a link to /proc/self/mem, whose offset 0 fails with EIO."""
    if os.geteuid() == 0:
        path.symlink_to("/proc/self/mem")
    else:
        path.write_bytes(b"secret")
        path.chmod(0)


def write_quirk_tree(root: Path, classes: list[str], per_class: int, ext: str = ".JPEG",
                     quirk_every: int = 1) -> dict[str, Expect]:
    """`root/<class>/<class>_<i><ext>`: every `quirk_every`-th file is a quirk (cycling
    through all kinds), the rest clean photos; plus one unreadable file. Returns
    the expected outcome by path relative to `root`'s parent-free source form."""
    expected: dict[str, Expect] = {}
    kinds = list(quirk_files(0))
    n = 0
    for c, cls in enumerate(classes):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            name = f"{cls}_{i}{ext}"
            if n % quirk_every == 0:
                kind = kinds[(n // quirk_every) % len(kinds)]
                data, exp = quirk_files(n)[kind]
            else:
                data, exp = _jpeg(photo(n)), Expect()
            (folder / name).write_bytes(data)
            expected[f"{cls}/{name}"] = exp
            n += 1
    bad = root / classes[0] / f"unreadable{ext}"
    make_unreadable(bad)
    expected[f"{classes[0]}/unreadable{ext}"] = Expect(reject="unreadable")
    return expected
