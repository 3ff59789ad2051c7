"""Real image files made with Pillow for the image tests (no downloads), and zips of them."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from typing import Any

from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def solid(color: Any, size: tuple[int, int] = (16, 16), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A one-colour image file."""
    return encode(Image.new(mode, size, color), fmt)


def distinct(i: int, fmt: str = "PNG", size: tuple[int, int] = (16, 16)) -> bytes:
    """Image number ``i``: a different colour for every i < 2**24."""
    return solid(((i * 37) % 256, (i * 11) // 256 % 256, i % 251), size, fmt)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (1-bit gray) with only a few rows of
    pixel data: what a decompression bomb looks like before anything is inflated."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 4)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def make_zip(members: dict[str, bytes] | list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    """A deflated zip of ``name -> bytes`` (a list allows repeats and hand-made ``ZipInfo``)."""
    items = list(members.items()) if isinstance(members, dict) else members
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in items:
            archive.writestr(name, content)
    return buffer.getvalue()


def image_folder(per_label: dict[str, int], fmt: str = "PNG", prefix: str = "") -> dict[str, bytes]:
    """``label/NNN.png`` members, every image distinct."""
    members, n = {}, 0
    for label, count in per_label.items():
        for j in range(count):
            members[f"{prefix}{label}/{j:03d}.{fmt.lower()}"] = distinct(n, fmt)
            n += 1
    return members
