"""Decoding one untrusted image, and the preprocessing every image gets before the backbone.

Contract:

* ``decode_image(data, param=..., limits=...)`` returns a fully decoded RGB ``PIL.Image`` or
  raises ``InvalidImageError`` (an ``InvalidInputError``, code ``invalid_input``: HTTP 422)
  whose message starts with ``param`` (``images[3]``, ``line 7``, a zip member name: the
  caller's name for the input) and whose ``.problem`` is the rest, so dataset parsers can
  re-raise it in their own words. Bytes or pixels over a limit raise its subclass
  ``ImageTooLargeError`` (code ``image_too_large``; the service may answer 413). The limit is
  always in the message.
* Checks, in order, each stopping at the first problem: a bytes-like value, not empty, at most
  ``max_bytes``; a format in ``ALLOWED_FORMATS`` (JPEG, PNG, WebP, GIF, BMP; only those
  Pillow plugins are ever tried, other well-known formats are named in the refusal); from the
  header alone, before any pixel is decoded: at most ``max_pixels`` pixels (a decompression
  bomb; Pillow's own process-wide bomb error or warning, should its global limit be lower, is
  turned into the same refusal) and no side under ``min_side``; then a FULL decode (a
  truncated or corrupt file is refused here, never half-read).
* The result is RGB, 8 bits per channel: EXIF orientation applied; grayscale, palette, CMYK
  and 16-bit grayscale (scaled, not clipped) converted; transparency (alpha or a
  transparent palette entry) composited on white. Animated GIF/WebP: the first frame. ICC
  profiles are ignored. A malformed EXIF block is ignored (the pixels are still good).
* ``preprocess`` turns an RGB image into the backbone's input, deterministically: the central
  square, resized (bicubic) to ``size`` x ``size`` (i.e. resize the short side to ``size``,
  then centre-crop), as a CHW float32 tensor normalised ``(x / 255 - 0.5) / 0.5`` (range
  [-1, 1], EfficientNet-Lite's convention). Validation and serving use exactly this;
  training adds ``adapters.vision.augment`` in front of ``to_tensor``.
* Nothing here touches the file system or Pillow's global settings.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps

from adapters.errors import InvalidInputError

INPUT_SIZE = 224  # EfficientNet-Lite0
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # Pillow format ids
ALLOWED_NAMES = "JPEG, PNG, WebP, GIF (first frame) and BMP"

# Well-known formats Pillow may or may not read, which we refuse by name (never decoded).
_OTHER_FORMATS: tuple[tuple[bytes, int, str], ...] = (
    (b"II*\x00", 0, "TIFF"), (b"MM\x00*", 0, "TIFF"), (b"8BPS", 0, "Photoshop (PSD)"),
    (b"\x00\x00\x01\x00", 0, "ICO"), (b"%PDF", 0, "PDF"), (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xffO\xffQ", 0, "JPEG 2000"), (b"ftypheic", 4, "HEIC"), (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"), (b"ftypavif", 4, "AVIF"), (b"qoif", 0, "QOI"),
    (b"<svg", 0, "SVG"), (b"<?xml", 0, "XML/SVG"), (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"),
)


@dataclass(frozen=True)
class ImageLimits:
    """What one image may be. Defaults: 16 MiB, 40 megapixels (a 36-MP camera fits; an RGBA
    decode of that is 160 MB, so keep concurrent decodes few), sides of at least 8 pixels
    (28 x 28 Fashion-MNIST passes; preprocessing upscales)."""

    max_bytes: int = 16 << 20
    max_pixels: int = 40_000_000
    min_side: int = 8

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "min_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageLimits.{name} must be a positive integer, got {value!r}")
        if self.max_pixels < self.min_side * self.min_side:
            raise ValueError("ImageLimits.max_pixels is below min_side squared: no image could pass")


class InvalidImageError(InvalidInputError):
    """An image cannot be used as given. ``param`` names it; ``problem`` is the message
    without that name (e.g. "is truncated or corrupt (...)")."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param} {problem}", param=param)
        self.problem = problem


class ImageTooLargeError(InvalidImageError):
    """An image is over the byte or pixel limit (the limit is in the message)."""

    code = "image_too_large"


def decode_image(data: bytes, *, param: str = "image", limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Validate and fully decode one image into an RGB ``PIL.Image`` (see the module contract)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImageError(param, f"must be image bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidImageError(param, "is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(param, f"is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes")
    image = _open(data, param, limits)
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            param, f"is {width:,} x {height:,} pixels ({width * height:,}; a decompression bomb?); "
            f"the limit is {limits.max_pixels:,} pixels")
    if min(width, height) < limits.min_side:
        raise InvalidImageError(
            param, f"is {width} x {height} pixels; each side must be at least {limits.min_side}")
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(param, f"is a decompression bomb ({error})") from None
    except MemoryError:
        raise
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, ValueError, ...
        raise InvalidImageError(param, f"is truncated or corrupt ({_reason(error)})") from None
    return _to_rgb(_oriented(image), param)


def preprocess(image: Image.Image, size: int = INPUT_SIZE) -> torch.Tensor:
    """The backbone's input for one RGB image: central square -> size x size -> normalised CHW."""
    return to_tensor(center_square(image, size))


def decode_batch(
    datas: Sequence[bytes], *, param: str = "images", limits: ImageLimits = ImageLimits(),
    size: int = INPUT_SIZE,
) -> torch.Tensor:
    """Decode and preprocess images into one ``[N, 3, size, size]`` batch; an error names the
    first bad one as ``param[i]``."""
    tensors = [preprocess(decode_image(data, param=f"{param}[{i}]", limits=limits), size)
               for i, data in enumerate(datas)]
    if not tensors:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    return torch.stack(tensors)


def center_square(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square of ``image``, resized (bicubic) to ``size`` x ``size``."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a CHW float32 tensor normalised ``(x / 255 - 0.5) / 0.5``."""
    if image.mode != "RGB":
        raise ValueError(f"to_tensor needs an RGB image, got mode {image.mode!r}")
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = pixels.view(height, width, 3).permute(2, 0, 1).to(torch.float32)
    return x.div_(255.0).sub_(0.5).div_(0.5).contiguous()


# --- internals ---------------------------------------------------------------------------


def _open(data: bytes, param: str, limits: ImageLimits) -> Image.Image:
    """Open lazily (header only) with only the allowed plugins."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's global limit (a warning, or an error when twice over it) fired before ours
        # could: the header claims more pixels than Pillow's process-wide maximum.
        raise ImageTooLargeError(
            param, f"is a decompression bomb ({_reason(error)}); the limit is "
            f"{limits.max_pixels:,} pixels") from None
    except MemoryError:
        raise
    except Exception as error:
        other = _other_format(data)
        if other:
            raise InvalidImageError(
                param, f"is in {other} format; allowed formats are {ALLOWED_NAMES}") from None
        if isinstance(error, Image.UnidentifiedImageError):
            raise InvalidImageError(
                param, f"is not an image in an allowed format ({ALLOWED_NAMES})") from None
        raise InvalidImageError(param, f"is truncated or corrupt ({_reason(error)})") from None


def _other_format(data: bytes) -> str | None:
    for magic, offset, name in _OTHER_FORMATS:
        if data[offset:offset + len(magic)] == magic:
            return name
    return None


def _oriented(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        return image


def _to_rgb(image: Image.Image, param: str) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale PNG: scale, do not clip
        image = image.convert("I").point(lambda v: v * (1 / 257) + 0.5).convert("L")
        mode = "L"
    try:
        if image.has_transparency_data:  # an alpha band, or a transparent palette entry/colour
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image if mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as error:
        raise InvalidImageError(param, f"has an unsupported color mode {mode!r} ({_reason(error)})") from None


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."
