"""The pure helpers behind the bot's messages: escaping, clipping, sizes, grids and files that fit."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from bot import render


def test_escape_defuses_mentions_and_markdown() -> None:
    role, user = "<@&175928847299117063>", "<@80351110224678912>"
    text = render.escape(f"@everyone @here {role} {user} **bold** `code`")
    for mention in ("@everyone", "@here", role, user):
        assert mention not in text
    assert "\\*\\*bold\\*\\*" in text and "\\`code\\`" in text


@given(st.text(), st.integers(min_value=0, max_value=300))
def test_clipped_text_fits_and_stays_escaped(text: str, limit: int) -> None:
    clipped = render.clip_escaped(text, limit)
    assert len(clipped) <= limit
    if len(render.escape(text)) <= limit:
        assert clipped == render.escape(text)
    elif clipped:
        assert clipped.endswith("…") and not clipped[:-1].endswith("\\")
        assert "@everyone" not in clipped and "@here" not in clipped


def test_result_text_fits_discord_and_shows_id_seeds_and_notes() -> None:
    text = render.result_text(
        7,
        "@everyone " + "x" * 5000,
        seeds=[1, 2],
        width=512,
        height=768,
        steps=25,
        scheduler="ddim",
        notes=["Exact reproduction of #3 with its stored seed."],
    )
    assert len(text) <= render.MAX_CONTENT
    head, note, prompt = text.split("\n")
    assert head == "**#7** · seeds 1, 2 · 512x768 · 25 steps · ddim"
    assert note == "-# Exact reproduction of #3 with its stored seed."
    assert prompt.startswith("> @\u200beveryone xxx") and prompt.endswith("…")


def test_a_multiline_prompt_stays_one_quoted_line_without_markdown() -> None:
    text = render.result_text(1, "# big\n> b", seeds=[5], width=64, height=64, steps=3, scheduler="lms")
    assert text.splitlines()[-1] == "> \\# big > b"


@pytest.mark.parametrize(
    ("aspect", "native", "step", "max_side", "size"),
    [
        ("square", 512, 64, 768, (512, 512)),
        ("portrait", 512, 64, 768, (512, 768)),
        ("landscape", 512, 64, 768, (768, 512)),
        ("wide", 512, 64, 768, (768, 384)),  # 910x512 shrunk to fit 768, rounded down to the step
        ("wide", 512, 64, 2048, (896, 512)),
        ("portrait", 64, 16, 768, (64, 96)),
    ],
)
def test_aspect_sizes(aspect: str, native: int, step: int, max_side: int, size: tuple[int, int]) -> None:
    assert render.aspect_size(aspect, native, step, max_side) == size


@pytest.mark.parametrize(("count", "sheet"), [(1, (10, 20)), (2, (20, 20)), (3, (20, 40)), (4, (20, 40))])
def test_grid_layout(count: int, sheet: tuple[int, int]) -> None:
    colors = ["red", "green", "blue", "yellow"][:count]
    images = [Image.new("RGB", (10, 20), color) for color in colors]
    grid = render.grid(images)
    assert grid.size == sheet
    for i, image in enumerate(images):  # reading order: left to right, then down
        x, y = (i % 2) * 10 + 5, (i // 2) * 20 + 10
        assert grid.getpixel((x, y)) == image.getpixel((0, 0))


def test_preview_is_a_small_png() -> None:
    data = render.preview_png(Image.new("RGB", (64, 32), "red"))
    with Image.open(io.BytesIO(data)) as preview:
        assert preview.format == "PNG" and preview.size == (render.PREVIEW_SIDE, render.PREVIEW_SIDE // 2)


def test_fit_files_keeps_order_within_the_limit_and_the_count() -> None:
    files = [("a", b"x" * 4), ("b", b"x" * 8), ("c", b"x" * 3)]
    assert render.fit_files(files, 10) == ([files[0], files[2]], [files[1]])
    many = [(str(i), b"x") for i in range(12)]
    kept, dropped = render.fit_files(many, 100)
    assert kept == many[: render.MAX_FILES] and dropped == many[render.MAX_FILES :]


def test_history_line_marks_unfinished_rows() -> None:
    assert render.history_line(3, "a *cat*", 42, "done", "<t:1:R>") == "`#3` a \\*cat\\* · seed 42 · <t:1:R>"
    assert render.history_line(4, "x", None, "failed", "<t:1:R>") == "`#4` x · no seed · failed · <t:1:R>"
