"""Untrusted image input, PNG output with A1111-style parameters, and cheap latent previews."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
MIN_SIDE = 32
MAX_ASPECT = 8.0


def decode_image(data: bytes, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an untrusted PNG, JPEG, WebP or GIF (first frame) into an upright RGB image.

    Follows Pillow's advice for untrusted files: a format allowlist, size limits checked from the header
    before any pixel is decoded, and decompression bombs treated as errors.
    """
    if not data:
        raise InvalidRequest("The image file is empty: attach a PNG, JPEG, WebP or GIF image.")
    if len(data) > max_bytes:
        raise InvalidRequest(f"The image is {len(data) / 2**20:.1f} MiB: attach one under {max_bytes // 2**20} MiB.")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequest(
                    f"The image is {width}x{height} pixels: attach one with at most {max_pixels // 10**6} megapixels."
                )
            image.seek(0)  # first frame of an animation
            image.load()
        except InvalidRequest:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            if isinstance(exc, UnidentifiedImageError):
                raise InvalidRequest("This file is not a PNG, JPEG, WebP or GIF image: attach one of those.") from exc
            raise InvalidRequest("The image is too large to decode safely: attach a smaller one.") from exc
        except (OSError, ValueError, EOFError, SyntaxError) as exc:
            raise InvalidRequest("The image file is damaged or truncated: re-save it and attach it again.") from exc
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_ASPECT * min(width, height):
        raise InvalidRequest(
            f"The image is {width}x{height}: attach one at least {MIN_SIDE} pixels on each side and at most "
            f"{MAX_ASPECT:g} times wider than tall."
        )
    with contextlib.suppress(Exception):  # broken EXIF must not lose the picture: keep it as stored
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB: composite transparency over white and scale 16-bit values down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: Pillow's convert("L") would clip at 255 instead of scaling.
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" or image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height, then crop the centre (no distortion, no borders)."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def format_parameters(
    *,
    prompt: str,
    negative: str,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    strength: float | None,
    lora_hashes: dict[str, str] | None = None,
    hires: tuple[float, int | None, str] | None = None,
) -> str:
    """The A1111 `parameters` text that existing SD tools read. The prompt keeps its `<lora:…>` tags, and
    `lora_hashes` (adapter name -> first 12 hex digits of the file's sha256) become A1111's `Lora hashes`. `hires`
    is a hires fix's (scale, steps or None for the first pass's, upscaler name); `Size` stays the first pass's, as
    A1111 writes it."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    fields = [
        f"Steps: {steps}",
        f"Sampler: {sampler}",
        f"CFG scale: {guidance:g}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
        f"Model: {model}",
    ]
    if strength is not None:
        fields.append(f"Denoising strength: {strength:g}")
    if hires is not None:
        scale, hires_steps, upscaler = hires
        fields.append(f"Hires upscale: {scale:g}")
        if hires_steps is not None:  # A1111 leaves it out when it is the first pass's
            fields.append(f"Hires steps: {hires_steps}")
        fields.append(f"Hires upscaler: {upscaler}")
    if lora_hashes:
        # As A1111 writes it: names without `:` or `,`, and the value JSON-quoted since it holds `:`.
        listed = ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in lora_hashes.items())
        fields.append(f"Lora hashes: {json.dumps(listed)}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_parameters(png: bytes) -> str | None:
    """The `parameters` text of a PNG written by this engine or by A1111, or None."""
    with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
        text = image.info.get("parameters")
    return text if isinstance(text, str) else None


# Linear map from SD latents to RGB, a cheap stand-in for the VAE decoder in previews.
_LATENT_RGB = torch.tensor(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
)


def latents_preview(latents: torch.Tensor) -> Image.Image:
    """A small RGB preview of one image's latents (C, h, w), at latent resolution."""
    latents = latents.detach().float().cpu()
    if latents.shape[0] == _LATENT_RGB.shape[0]:
        rgb = torch.einsum("chw,ck->hwk", latents, _LATENT_RGB)  # (h, w, 3)
    else:
        rgb = latents[:3].permute(1, 2, 0)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="RGB")
