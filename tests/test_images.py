"""Untrusted images: what is accepted, how it is normalised, and a corpus of hostile files."""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from sdengine import InvalidRequest, decode_image, read_parameters
from sdengine.images import MAX_BYTES, fit_image, format_parameters, png_bytes


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def rgb(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (200, 30, 60)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def test_accepts_the_four_formats() -> None:
    for fmt in ("PNG", "JPEG", "WEBP", "GIF"):
        image = decode_image(encode(rgb(), fmt))
        assert image.mode == "RGB" and image.size == (64, 48)


def test_first_frame_of_an_animation() -> None:
    frames = [rgb(colour=(255, 0, 0)), rgb(colour=(0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    r, _, b = decode_image(data).getpixel((10, 10))  # type: ignore[misc]
    assert r > 200 and b < 50


def test_exif_orientation_is_applied() -> None:
    image = rgb(64, 40)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    assert decode_image(encode(image, "JPEG", exif=exif)).size == (40, 64)


def test_alpha_is_composited_over_white() -> None:
    transparent = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert decode_image(encode(transparent, "PNG")).getpixel((5, 5)) == (255, 255, 255)
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, "PNG", transparency=0)).getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16))
    assert decode_image(encode(grey, "PNG")).getpixel((1, 1)) == (128, 128, 128)


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # red
    r, g, b = decode_image(encode(cmyk, "JPEG")).getpixel((5, 5))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


def _bomb() -> bytes:
    # A 20000x20000 palette PNG compresses to a few hundred KB but would need 400 MB to decode.
    return encode(Image.new("P", (20000, 20000)), "PNG")


def _png_with_huge_size_header() -> bytes:
    data = bytearray(encode(rgb(), "PNG"))
    data[16:24] = struct.pack(">II", 100000, 100000)  # IHDR width/height; CRC now wrong too
    return bytes(data)


def _zip_named_png() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.txt", "hello")
    return buffer.getvalue()


HOSTILE: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "decompression bomb": _bomb,
    "size header lies": _png_with_huge_size_header,
    "truncated png": lambda: encode(rgb(200, 200), "PNG")[:300],
    "truncated jpeg": lambda: encode(rgb(200, 200), "JPEG")[:200],
    "zip named png": _zip_named_png,
    "text": lambda: b"just some text, not an image",
    "svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "eps": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    "pdf": lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    "tiff": lambda: encode(rgb(), "TIFF"),
    "bmp": lambda: encode(rgb(), "BMP"),
    "1x1": lambda: encode(rgb(1, 1), "PNG"),
    "10000x10": lambda: encode(rgb(10000, 10), "PNG"),
    "too many bytes": lambda: b"\x89PNG" + b"\0" * (MAX_BYTES + 1),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_files_get_one_clear_sentence(name: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        decode_image(HOSTILE[name]())
    message = str(error.value)
    assert message.endswith(".") and "\n" not in message and len(message) < 200


def test_fit_covers_and_crops_the_centre() -> None:
    wide = Image.new("RGB", (200, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (50, 0, 150, 100))  # white centre band
    fitted = fit_image(wide, 64, 64)
    assert fitted.size == (64, 64) and fitted.getpixel((32, 32)) == (255, 255, 255)


def test_png_parameters_round_trip() -> None:
    text = format_parameters(
        prompt="a cat",
        negative="dog",
        steps=20,
        sampler="Euler a",
        guidance=7.5,
        seed=42,
        width=512,
        height=512,
        model="tiny",
        strength=None,
    )
    assert text.splitlines() == [
        "a cat",
        "Negative prompt: dog",
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: tiny",
    ]
    assert read_parameters(png_bytes(rgb(), text)) == text
    assert read_parameters(encode(rgb(), "PNG")) is None
