"""Pure helpers that turn generations into what Discord shows: text, grids, previews, and files that fit.

Nothing here talks to Discord or the engine, so all of it is unit-tested without a network.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import discord
from PIL import Image

import sdengine

MAX_CONTENT = 2000  # characters in one Discord message
MAX_FILES = 10  # attachments on one Discord message
PREVIEW_SIDE = 256

# Aspect choices for /imagine: (width, height) ratio.
ASPECTS: dict[str, tuple[int, int]] = {
    "square": (1, 1),
    "portrait": (2, 3),
    "landscape": (3, 2),
    "wide": (16, 9),
}

File = tuple[str, bytes]  # (filename, data)

# Bidi embeddings, overrides and isolates: in echoed text they could reverse how the rest of our line reads.
BIDI_CONTROLS = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))


def escape(text: str) -> str:
    """User text made inert: no markdown, no mention that could ping (allowed_mentions is the backstop), and no
    bidi control that could make the rest of the line read backwards."""
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text.translate(BIDI_CONTROLS)))


def clip_escaped(text: str, limit: int) -> str:
    """`escape(text)` in at most `limit` characters, ending with … when cut.

    Cuts the raw text, not the escaped one, so a cut never splits an escape sequence.
    """
    escaped = escape(text)
    if len(escaped) <= limit:
        return escaped
    if limit < 1:
        return ""
    keep = limit - 1
    while keep > 0:
        escaped = escape(text[:keep]).rstrip("\\")
        if len(escaped) + 1 <= limit:
            return escaped + "…"
        keep -= len(escaped) + 1 - limit
    return "…"


def one_line(text: str) -> str:
    return " ".join(text.split())


def aspect_size(aspect: str, native: int, step: int, max_side: int) -> tuple[int, int]:
    """Width and height for an aspect choice: the short side is the model's native size, the long side follows
    the ratio, both multiples of `step`, and the whole shrinks (keeping the ratio) to fit `max_side`."""
    rw, rh = ASPECTS[aspect]
    scale = native / min(rw, rh)
    width, height = rw * scale, rh * scale
    fit = min(1.0, max_side / max(width, height))
    return (
        max(step, math.floor(width * fit / step) * step),
        max(step, math.floor(height * fit / step) * step),
    )


def fit_aspect(aspect: float, native: int, step: int, max_side: int) -> tuple[int, int]:
    """Width and height for a width/height ratio at about the model's native area (native²), both multiples of
    `step`, and the whole shrunk (keeping the ratio) to fit `max_side`. An 8:1 init image on a 512 model and a
    768 limit gives 768x96, not 1448x184."""
    width, height = native * aspect**0.5, native / aspect**0.5
    fit = min(1.0, max_side / max(width, height))
    largest = max(step, max_side // step * step)
    return (
        min(largest, max(step, round(width * fit / step) * step)),
        min(largest, max(step, round(height * fit / step) * step)),
    )


def grid(images: Sequence[Image.Image]) -> Image.Image:
    """Images side by side: 1x2 for two, 2x2 for three or four (like Midjourney), in reading order."""
    columns = 1 if len(images) == 1 else 2
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def preview_png(image: Image.Image) -> bytes:
    """A latent preview scaled to a visible but small size."""
    scale = PREVIEW_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return png(image.resize(size, Image.Resampling.BILINEAR))


def image_name(gen_id: int, index: int) -> str:
    """The filename of image `index` of a result; the Vary button finds its image by this name."""
    return f"sdbot-{gen_id}-{index}.png"


def grid_name(gen_id: int) -> str:
    return f"sdbot-{gen_id}-grid.png"


def fit_files(files: Sequence[File], limit: int) -> tuple[list[File], list[File]]:
    """Keep files in order while their total stays within `limit` bytes and `MAX_FILES`; return (kept, dropped)."""
    kept: list[File] = []
    dropped: list[File] = []
    total = 0
    for file in files:
        size = len(file[1])
        if len(kept) < MAX_FILES and total + size <= limit:
            kept.append(file)
            total += size
        else:
            dropped.append(file)
    return kept, dropped


def queued_text(gen_id: int, position: int, length: int) -> str:
    return f"**#{gen_id}** · queued: position {position} of {length}"


KIND_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def model_label(name: str, info: sdengine.ModelInfo, *, default: bool, loaded: bool) -> str:
    """One model as /models and the model option's list show it, e.g. `xl · SDXL 1024² · default · loaded`."""
    parts = [name, f"{KIND_LABELS.get(info.kind, info.kind)} {info.native_size}²"]
    if default:
        parts.append("default")
    parts.append("loaded" if loaded else "not loaded: its first request waits for it")
    return " · ".join(parts)


def loading_text(gen_id: int, model: str) -> str:
    return f"**#{gen_id}** · loading model {model} first…"


def started_text(gen_id: int, batch_size: int) -> str:
    shared = f" (in a batch of {batch_size} images)" if batch_size > 1 else ""
    return f"**#{gen_id}** · starting{shared}"


def step_text(gen_id: int, step: int, total: int) -> str:
    return f"**#{gen_id}** · step {step}/{total}"


def seeds_text(seeds: Sequence[int]) -> str:
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return "seeds " + ", ".join(str(s) for s in seeds)


def result_text(
    gen_id: int,
    prompt: str,
    *,
    seeds: Sequence[int],
    width: int,
    height: int,
    steps: int,
    scheduler: str,
    notes: Sequence[str] = (),
) -> str:
    """The result message: id, seeds and settings, then notes (plain sentences from the bot and engine), then the
    escaped prompt, clipped so that the whole message fits Discord's limit."""
    head = f"**#{gen_id}** · {seeds_text(seeds)} · {width}x{height} · {steps} steps · {scheduler}"
    lines = [head, *(f"-# {one_line(note)}" for note in notes)]
    body = "\n".join(lines)
    room = MAX_CONTENT - len(body) - len("\n> ")
    return f"{body}\n> {clip_escaped(one_line(prompt), room)}" if room > 1 else body[:MAX_CONTENT]


def history_line(gen_id: int, prompt: str, seed: int | None, status: str, timestamp: str) -> str:
    """One /history entry; `timestamp` is a Discord timestamp markup such as `<t:1700000000:R>`."""
    seed_part = f"seed {seed}" if seed is not None else "no seed"
    mark = "" if status == "done" else f" · {status}"
    return f"`#{gen_id}` {clip_escaped(one_line(prompt), 60)} · {seed_part}{mark} · {timestamp}"
