"""adapters.vision.images (decoding untrusted images, preprocessing) and adapters.vision.augment."""

from __future__ import annotations

import os
import random

import pytest
import torch
from PIL import Image

from adapters.errors import InvalidInputError
from adapters.vision.augment import Augmentation, example_rng, random_crop_box
from adapters.vision.images import (
    ImageLimits, ImageTooLargeError, InvalidImageError, decode_batch, decode_image, preprocess, to_tensor,
)
from tests.image_files import encode, png_header_only, solid


def refused(data: object, *, limits: ImageLimits = ImageLimits(), param: str = "images[3]") -> InvalidImageError:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data, param=param, limits=limits)  # type: ignore[arg-type]
    error = caught.value
    assert error.param == param and error.message == f"{param} {error.problem}"
    return error


# --- accepted images: modes and formats become RGB -----------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(solid((200, 40, 10), (20, 12), fmt))
    assert image.mode == "RGB" and image.size == (20, 12)
    r, g, b = image.getpixel((5, 5))
    assert abs(r - 200) <= 8 and abs(g - 40) <= 8 and abs(b - 10) <= 8


def test_rgba_is_composited_on_white() -> None:
    assert decode_image(solid((255, 0, 0, 128), mode="RGBA")).getpixel((1, 1)) == (255, 127, 127)
    assert decode_image(solid((0, 0, 0, 0), mode="RGBA")).getpixel((1, 1)) == (255, 255, 255)
    assert decode_image(solid((0, 0), mode="LA")).getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_a_transparent_entry_is_white_there() -> None:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste(1, (0, 0, 8, 16))
    decoded = decode_image(encode(image, "PNG", transparency=0))
    assert decoded.getpixel((2, 2)) == (255, 0, 0) and decoded.getpixel((12, 2)) == (255, 255, 255)


def test_grayscale_cmyk_and_16_bit_become_rgb() -> None:
    assert decode_image(solid(77, mode="L")).getpixel((1, 1)) == (77, 77, 77)
    assert decode_image(solid(1, mode="1")).getpixel((1, 1)) == (255, 255, 255)
    assert decode_image(solid((0, 255, 255, 0), fmt="JPEG", mode="CMYK")).getpixel((3, 3)) == (255, 0, 0)
    # 16-bit grayscale is scaled to 8 bits, not clipped at 255 (32896 / 257 = 128).
    assert decode_image(solid(32896, mode="I;16")).getpixel((1, 1)) == (128, 128, 128)


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (20, 10), (255, 0, 0))
    stored.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: left becomes top
    shown = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert shown.size == (10, 20)
    assert shown.getpixel((5, 2))[0] > 200 and shown.getpixel((5, 17))[2] > 200


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data).getpixel((1, 1)) == (255, 0, 0)


# --- refusals, each naming the input ---------------------------------------------------------


def test_not_bytes_empty_and_random_bytes_are_refused() -> None:
    assert refused("abc").problem == "must be image bytes, not str"
    assert refused(b"").problem == "is empty"
    problem = refused(os.urandom(256)).problem
    assert problem == "is not an image in an allowed format (JPEG, PNG, WebP, GIF (first frame) and BMP)"
    assert isinstance(refused(b"hello"), InvalidInputError)  # code invalid_input: HTTP 422


def test_other_formats_are_refused_by_name() -> None:
    problem = refused(solid((1, 2, 3), fmt="TIFF")).problem
    assert problem == "is in TIFF format; allowed formats are JPEG, PNG, WebP, GIF (first frame) and BMP"
    assert refused(b"\x00\x00\x00\x1cftypheic" + bytes(64)).problem.startswith("is in HEIC format")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_refused(fmt: str) -> None:
    data = encode(Image.effect_noise((64, 64), 40).convert("RGB"), fmt)
    assert refused(data[: len(data) // 2]).problem.startswith("is truncated or corrupt (")


def test_bytes_over_the_limit_are_refused() -> None:
    error = refused(solid((1, 2, 3)), limits=ImageLimits(max_bytes=50))
    assert isinstance(error, ImageTooLargeError) and error.code == "image_too_large"
    assert error.problem.endswith("bytes; the limit is 50 bytes")


def test_decompression_bombs_are_refused_from_the_header() -> None:
    # 7000 x 7000 claimed, a few rows present: over our 40 MP default, refused before decoding.
    error = refused(png_header_only(7000, 7000))
    assert isinstance(error, ImageTooLargeError)
    assert error.problem == ("is 7,000 x 7,000 pixels (49,000,000; a decompression bomb?); "
                             "the limit is 40,000,000 pixels")
    # 50000 x 50000: over Pillow's own process-wide limit, which fires first: same refusal.
    error = refused(png_header_only(50000, 50000))
    assert isinstance(error, ImageTooLargeError) and error.problem.startswith("is a decompression bomb (")
    # A complete, real one: 8000 x 8000 of one colour compresses to a few kB.
    real = encode(Image.new("1", (8000, 8000), 0), "PNG")
    assert len(real) < 100_000
    assert refused(real).problem.startswith("is 8,000 x 8,000 pixels")
    assert refused(solid(0, (100, 100)), limits=ImageLimits(max_pixels=9_999)).problem.endswith(
        "the limit is 9,999 pixels")


def test_too_small_images_are_refused() -> None:
    assert refused(solid((1, 2, 3), (4, 100))).problem == "is 4 x 100 pixels; each side must be at least 8"
    assert decode_image(solid((1, 2, 3), (28, 28)), limits=ImageLimits(min_side=28)).size == (28, 28)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="min_side must be a positive integer"):
        ImageLimits(min_side=0)
    with pytest.raises(ValueError, match="below min_side squared"):
        ImageLimits(max_pixels=10, min_side=8)


# --- preprocessing ---------------------------------------------------------------------------


def test_preprocess_normalises_a_centre_square_to_chw_float32() -> None:
    x = preprocess(decode_image(solid((255, 0, 128), (40, 30))), size=32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = torch.tensor([255, 0, 128], dtype=torch.float32).div(255).sub(0.5).div(0.5)
    assert torch.allclose(x[:, 10, 10], expected, atol=1e-6)


def test_preprocess_keeps_the_centre_of_a_wide_image() -> None:
    wide = Image.new("RGB", (300, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (100, 0, 200, 100))  # red | blue | red
    x = preprocess(wide, size=50)
    inner = x[:, :, 1:-1]  # the edge columns blend with the red just outside (filter support)
    assert torch.all(inner[2] > 0.9) and torch.all(inner[0] < -0.9)  # only the blue centre is left
    assert torch.equal(x, preprocess(wide, size=50))  # deterministic


def test_decode_batch_stacks_and_names_the_bad_image() -> None:
    batch = decode_batch([solid((1, 2, 3)), solid(9, mode="L", fmt="JPEG")], size=24)
    assert batch.shape == (2, 3, 24, 24)
    with pytest.raises(InvalidImageError) as caught:
        decode_batch([solid((1, 2, 3)), b"junk"], size=24)
    assert caught.value.param == "images[1]" and caught.value.message.startswith("images[1] is not an image")
    assert decode_batch([], size=24).shape == (0, 3, 24, 24)
    with pytest.raises(ValueError, match="needs an RGB image"):
        to_tensor(Image.new("L", (8, 8)))


# --- augmentation ----------------------------------------------------------------------------


def photo() -> Image.Image:
    return Image.effect_noise((60, 40), 60).convert("RGB")


def test_augmentation_is_deterministic_for_a_seed() -> None:
    augment, image = Augmentation(size=32), photo()
    first = augment.apply(image, example_rng(7, 0, 3))
    assert first.size == (32, 32) and first.mode == "RGB"
    assert first.tobytes() == augment.apply(image, example_rng(7, 0, 3)).tobytes()
    others = {augment.apply(image, example_rng(7, epoch, 3)).tobytes() for epoch in range(1, 6)}
    assert first.tobytes() not in others and len(others) > 1
    assert torch.equal(augment.tensor(image, example_rng(1, 2, 3)), augment.tensor(image, example_rng(1, 2, 3)))
    assert example_rng(1, 2, 3).random() == random.Random("1\x002\x003").random()


def test_flip_mirrors_some_crops_and_can_be_turned_off() -> None:
    image = photo().crop((0, 0, 40, 40))
    whole = Augmentation(size=40, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes()
    outputs = [whole.apply(image, random.Random(seed)).tobytes() for seed in range(20)]
    assert mirrored in outputs and image.tobytes() in outputs
    still = Augmentation(size=40, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert all(still.apply(image, random.Random(s)).tobytes() == image.tobytes() for s in range(20))


def test_crop_boxes_stay_inside_and_respect_scale() -> None:
    rng = random.Random(0)
    for _ in range(300):
        width, height = rng.randint(8, 400), rng.randint(8, 400)
        left, top, right, bottom = random_crop_box((width, height), rng, (0.35, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
    # A strip no crop of the allowed ratio fits: the central crop, clamped to 4/3.
    assert random_crop_box((1000, 10), random.Random(1), (0.9, 1.0), (3 / 4, 4 / 3)) == (493, 0, 506, 10)


def test_augmentation_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="scale"):
        Augmentation(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="ratio"):
        Augmentation(ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="size"):
        Augmentation(size=0)
