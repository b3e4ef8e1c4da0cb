"""Hostile input through the real bot: odd and hostile attachments, abusive prompts, out-of-range options.

One bot serves a whole corpus, case after case. Every case must end within a time bound in a result or in one plain
sentence, with the request's row in SQLite, and nothing the bot sends may ping anyone. The engine-level image corpus
is in tests/test_images.py; this one goes through Discord, the download and the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

import sdengine
from bot import render
from bot.replies import plain
from tests.botharness import Harness, fake_fixture, harness_fixture, result_id
from tests.fakediscord import FakeAttachment, FakeDiscord, FakeInteraction, FakeMessage

__all__ = ["fake_fixture", "harness_fixture"]  # fixtures used by name

LIMIT = 2 * 1024 * 1024  # max_image_bytes for these tests: small, so the oversized files stay cheap
CASE_SECONDS = 30  # the bound on one case, from the command to its last message
# What Discord would turn into a ping: @everyone, @here, or a user/role mention of a real snowflake.
PING = re.compile(r"@(everyone|here)|<@[!&]?\d{17,20}>")
RESULT = "result"  # the expected outcome of a case that must give a picture


# ---- the attachment corpus --------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def rgb(width: int = 64, height: int = 64, colour: tuple[int, int, int] = (200, 40, 90)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """`png` with one more chunk right after IHDR."""
    end_of_ihdr = 8 + 4 + 4 + 13 + 4
    return png[:end_of_ihdr] + png_chunk(kind, data) + png[end_of_ihdr:]


def bomb(side: int) -> bytes:
    """A side x side black 1-bit PNG, written chunk by chunk: a few KB that decode to side² pixels."""
    row = b"\x00" * (1 + side // 8)  # the filter byte, then 8 pixels a byte
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def ztxt_bomb() -> bytes:
    """A small PNG whose compressed text chunk inflates to 64 MB."""
    return with_chunk(encode(rgb(), "PNG"), b"zTXt", b"comment\x00\x00" + zlib.compress(b"A" * 64 * 2**20, 9))


def header_claims(fmt: str, width: int, height: int) -> bytes:
    """A small valid image whose header then lies about its size."""
    data = bytearray(encode(rgb(), fmt))
    if fmt == "PNG":
        data[16:24] = struct.pack(">II", width, height)  # IHDR (the CRC is now wrong too)
    elif fmt == "GIF":
        data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    else:  # JPEG: the SOF0 marker holds height then width
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def zip_file() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat.png", encode(rgb(), "PNG"))
    return buffer.getvalue()


def animation(fmt: str, frames: int) -> bytes:
    images = [rgb(64, 64, (i % 256, 255 - i % 256, 90)) for i in range(frames)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=20, loop=0)


def exif_jpeg(size: int) -> bytes:
    image = rgb(64, 48)
    exif = image.getexif()
    exif[0x010E] = "x" * size  # ImageDescription
    exif[0x0112] = 8  # rotated: exercises the transpose too
    return encode(image, "JPEG", exif=exif.tobytes())


def broken_exif_jpeg() -> bytes:
    """A JPEG whose APP1 segment claims to be EXIF but holds garbage."""
    data = encode(rgb(), "JPEG")
    garbage = b"Exif\x00\x00" + b"MM\x00\x2a\xff\xff\xff\xff" + b"\x00" * 40
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage + data[2:]


def grey16() -> bytes:
    return encode(Image.fromarray(np.full((48, 48), 40000, dtype=np.uint16)), "PNG")


def palette_with_alpha() -> bytes:
    image = Image.new("P", (48, 48), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return encode(image, "PNG", transparency=0)


def huge_text_chunk() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "@everyone " * 150_000)  # 1.5 MB of text in the file: over Pillow's text limit
    return encode(rgb(), "PNG", pnginfo=info)


@dataclass(frozen=True)
class FileCase:
    name: str
    upload: Callable[[FakeDiscord], FakeAttachment]
    expect: str  # RESULT, or the start of the one sentence
    downloaded: bool = True  # False: it must be refused from its attachment data alone


def file(
    filename: str, data: Callable[[], bytes], content_type: str | None = None
) -> Callable[[FakeDiscord], FakeAttachment]:
    """An upload made when the case runs; the content type defaults to a guess from the filename, like Discord's."""
    return lambda fake: fake.upload(filename, data(), content_type)


NOT_AN_IMAGE = "This file is not a PNG, JPEG, WebP or GIF image: attach one of those."
NOT_AN_IMAGE_TYPE = "That file is not an image: attach a PNG, JPEG, WebP or GIF."
DAMAGED = "The image file is damaged or truncated: re-save it and attach it again."
EMPTY = "The image file is empty: attach a PNG, JPEG, WebP or GIF image."
TOO_BIG = "The image is over 2.0 MiB: use a smaller one."
TOO_LARGE = "The image is too large to decode safely: attach a smaller one."

FILES = [
    FileCase("empty", file("empty.png", lambda: b""), EMPTY),
    FileCase("decompression bomb", file("bomb.png", lambda: bomb(30000)), TOO_LARGE),
    FileCase("over the pixel cap", file("5k.png", lambda: bomb(5000)), "The image is 5000x5000 pixels: attach one"),
    FileCase("zTXt bomb", file("ztxt.png", ztxt_bomb), DAMAGED),
    FileCase("PNG header lies", file("big.png", lambda: header_claims("PNG", 100_000, 100_000)), NOT_AN_IMAGE),
    FileCase("GIF screen lies", file("big.gif", lambda: header_claims("GIF", 65_000, 65_000)), TOO_LARGE),
    FileCase("JPEG SOF lies", file("big.jpg", lambda: header_claims("JPEG", 60_000, 60_000)), TOO_LARGE),
    FileCase("truncated PNG", file("cut.png", lambda: encode(rgb(300, 300), "PNG")[:400]), DAMAGED),
    FileCase("truncated JPEG", file("cut.jpg", lambda: encode(rgb(300, 300), "JPEG")[:300]), DAMAGED),
    FileCase("truncated WebP", file("cut.webp", lambda: encode(rgb(300, 300), "WEBP")[:60]), DAMAGED),
    FileCase("zip named .png", file("cat.png", zip_file, "image/png"), NOT_AN_IMAGE),
    FileCase("zip as a zip", file("cat.zip", zip_file), NOT_AN_IMAGE_TYPE, downloaded=False),
    FileCase("text named .jpg", file("cat.jpg", lambda: b"hello, I am text\n" * 10), NOT_AN_IMAGE),
    FileCase("HTML as image/png", file("page", lambda: b"<html><script>alert(1)</script>", "image/png"), NOT_AN_IMAGE),
    FileCase(
        "SVG",
        file("x.svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>'),
        NOT_AN_IMAGE,
    ),
    FileCase(
        "EPS",
        file("x.eps", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
        NOT_AN_IMAGE_TYPE,
        downloaded=False,
    ),
    FileCase(
        "EPS named .png", file("x.png", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), NOT_AN_IMAGE
    ),
    FileCase(
        "PDF",
        file("x.pdf", lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"),
        NOT_AN_IMAGE_TYPE,
        downloaded=False,
    ),
    FileCase("TIFF", file("x.tiff", lambda: encode(rgb(), "TIFF")), NOT_AN_IMAGE),
    FileCase("BMP", file("x.bmp", lambda: encode(rgb(), "BMP")), NOT_AN_IMAGE),
    FileCase("ICO", file("x.ico", lambda: encode(rgb(), "ICO")), NOT_AN_IMAGE),
    FileCase("JPEG 2000", file("x.jp2", lambda: encode(rgb(), "JPEG2000"), "image/jp2"), NOT_AN_IMAGE),
    FileCase("1x1", file("dot.png", lambda: encode(rgb(1, 1), "PNG")), "The image is 1x1: attach one at least 32"),
    FileCase("10000x10", file("wide.png", lambda: encode(rgb(10000, 10), "PNG")), "The image is 10000x10"),
    FileCase("10x10000", file("tall.png", lambda: encode(rgb(10, 10000), "PNG")), "The image is 10x10000"),
    FileCase(
        "claims to be over the limit",
        lambda fake: fake.upload("big.png", encode(rgb(), "PNG"), size=LIMIT + 1),
        "The image is 2.0 MiB: attach one under 2.0 MiB.",
        downloaded=False,
    ),
    FileCase(
        "claims to be small, is over the limit",
        lambda fake: fake.upload("liar.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * LIMIT, size=1000),
        TOO_BIG,
    ),
    FileCase("huge text chunk", file("text.png", huge_text_chunk), RESULT),
    FileCase("animated GIF, 300 frames", file("anim.gif", lambda: animation("GIF", 300)), RESULT),
    FileCase("animated WebP, 120 frames", file("anim.webp", lambda: animation("WEBP", 120)), RESULT),
    FileCase("animated PNG, 60 frames", file("anim.png", lambda: animation("PNG", 60)), RESULT),
    FileCase(
        "CMYK JPEG", file("cmyk.jpg", lambda: encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")), RESULT
    ),
    FileCase("16-bit grey PNG", file("grey16.png", grey16), RESULT),
    FileCase("palette with alpha", file("palette.png", palette_with_alpha), RESULT),
    FileCase("grey with alpha", file("la.png", lambda: encode(Image.new("LA", (48, 48), (90, 10)), "PNG")), RESULT),
    FileCase("fully transparent", file("clear.png", lambda: encode(Image.new("RGBA", (48, 48)), "PNG")), RESULT),
    FileCase("huge EXIF", file("exif.jpg", lambda: exif_jpeg(60_000)), RESULT),
    FileCase("broken EXIF", file("badexif.jpg", broken_exif_jpeg), RESULT),
    FileCase("progressive JPEG", file("prog.jpg", lambda: encode(rgb(), "JPEG", progressive=True)), RESULT),
    FileCase("JPEG sent as image/png", file("photo", lambda: encode(rgb(), "JPEG"), "image/png"), RESULT),
    FileCase("PNG with a zip appended", file("polyglot.png", lambda: encode(rgb(), "PNG") + zip_file()), RESULT),
    FileCase("RTL override in the name", file("cat\u202egnp.exe.png", lambda: encode(rgb(), "PNG")), RESULT),
    FileCase("8:1, the widest allowed", file("banner.png", lambda: encode(rgb(512, 64), "PNG")), RESULT),
]


# ---- running cases against one bot ----------------------------------------------------------------------------


def with_limits(harness: Harness, **limits: Any) -> Harness:
    settings = harness.settings
    return dataclasses.replace(
        harness, settings=dataclasses.replace(settings, limits=dataclasses.replace(settings.limits, **limits))
    )


def is_end(message: FakeMessage) -> bool:
    """A finished result, or the one ephemeral sentence."""
    return result_id(message) is not None or (message.ephemeral and not message.loading and not message.deleted)


async def end_of(inter: FakeInteraction) -> str:
    """RESULT when the interaction ends in a picture, else its one ephemeral sentence."""
    callback = await inter.wait_callback()
    assert callback.latency < 3, f"acknowledged after {callback.latency:.2f} s"
    end = await inter.wait_message(is_end, timeout=CASE_SECONDS)
    if result_id(end) is not None:
        assert end.attachments and not end.ephemeral
        return RESULT
    visible = [m for m in inter.messages if not m.deleted]
    assert visible == [end], [m.content for m in visible]
    assert not end.attachments and not end.components
    return end.content


def one_sentence(text: str) -> bool:
    return text.endswith(".") and "\n" not in text and len(text) < 300


async def check_row(harness: Harness, user_id: int, prompt: str, got: str) -> None:
    """The newest row of the user is this case's: done with a result, failed with the sentence as its reason."""
    row, *_ = await harness.rows_of(user_id)
    assert row.prompt == prompt, (row.prompt[:50], prompt[:50])
    # The user is told first and the row is written after (see GenerationService), so wait for the row.
    row = await harness.wait_row(row.id, lambda r: r.finished)
    if got == RESULT:
        assert row.status == "done", row.reason
    else:
        assert row.status == "failed" and row.reason is not None and plain(row.reason) == got


async def run_cases(cases: list[tuple[str, str, Callable[[], Any]]]) -> list[str]:
    """Run (name, expected, case) in order, each within CASE_SECONDS; returns the failures, one line each. A case
    is a coroutine function that returns what it got (RESULT or a sentence) and asserts the rest."""
    failures = []
    for name, expected, case in cases:
        started = time.monotonic()
        try:
            async with asyncio.timeout(CASE_SECONDS):
                got = await case()
            if not (got == expected == RESULT or (got != RESULT and got.startswith(expected) and one_sentence(got))):
                failures.append(f"{name}: expected {expected[:60]!r}, got {got[:80]!r}")
        except Exception as exc:  # one broken case must not hide the others
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
        elapsed = time.monotonic() - started
        print(f"{name:45.45s} {elapsed:5.2f} s  {'answered' if expected == RESULT else 'refused'}")
    return failures


def assert_nobody_pinged(fake: FakeDiscord) -> None:
    """Every message the bot sent or edited disallowed all mentions, mentions nobody, and holds no raw mention."""
    bodies = [r.json.get("data", r.json) if "/callback" in r.path else r.json for r in fake.requests]
    sent = [b for b in bodies if isinstance(b, dict) and b.get("content")]
    assert sent
    for body in sent:
        assert body["allowed_mentions"]["parse"] == [] and not body["allowed_mentions"].get("replied_user"), body
        assert PING.search(body["content"]) is None, body["content"]
    for message in fake.messages:
        if message.author is fake.bot_user:
            assert message.mentions == [] and PING.search(message.content) is None, message.content


# ---- the tests ----------------------------------------------------------------------------------------------


async def test_hostile_attachments_get_a_picture_or_one_sentence(harness: Harness) -> None:
    harness, fake = with_limits(harness, max_image_bytes=LIMIT), harness.fake
    assert len(FILES) >= 30

    def case(file_case: FileCase) -> Callable[[], Any]:
        async def run() -> str:
            attachment = file_case.upload(fake)
            prompt = f"attachment: {file_case.name}"
            inter = await fake.slash_command(
                "imagine", {"prompt": prompt, "seed": 1}, attachments={"image": attachment}
            )
            got = await end_of(inter)
            await check_row(harness, fake.alice.id, prompt, got)
            downloads = fake.find_requests("GET", f"/attachments/.*/{attachment.id}/")
            assert bool(downloads) == file_case.downloaded, f"{len(downloads)} downloads"
            return got

        return run

    async with harness.running():
        failures = await run_cases([(c.name, c.expect, case(c)) for c in FILES])
    assert failures == []
    assert_nobody_pinged(fake)


def prompt_cases(fake: FakeDiscord) -> list[tuple[str, dict[str, Any], str]]:
    """(name, /imagine options, expected outcome): prompts that try to ping, format, overflow or inject, and
    option values outside the command's choices and ranges, as a forged or stale client could send them."""
    role = fake.guild.roles[-1]
    return [
        ("@everyone", {"prompt": "@everyone look at this"}, RESULT),
        ("@here", {"prompt": "@here come and see"}, RESULT),
        ("role mention", {"prompt": f"<@&{role.id}> assemble"}, RESULT),
        ("user mentions", {"prompt": f"<@{fake.bob.id}> and <@!{fake.carol.id}> in a boat"}, RESULT),
        ("mentions in the negative", {"prompt": "a cat", "negative": f"@everyone <@&{role.id}>"}, RESULT),
        ("markdown", {"prompt": "**bold** __under__ ~~strike~~ ||spoiler|| `code` # not a heading"}, RESULT),
        ("code fence", {"prompt": "```py\nimport os; os.system('rm -rf /')\n```"}, RESULT),
        ("heading, quote, subtext", {"prompt": "# HUGE\n> quoted\n-# small print"}, RESULT),
        ("masked link", {"prompt": "[free nitro](https://evil.example/login)"}, RESULT),
        ("6000 characters", {"prompt": "a" * 6000}, "The prompt has 6000 characters: keep it under 2000."),
        ("6000-character negative", {"prompt": "a cat", "negative": "b" * 6000}, "The negative prompt has 6000"),
        ("zero-width characters", {"prompt": "a\u200bc\u200ca\u200dt\u2060"}, RESULT),
        ("only invisible characters", {"prompt": "\u200b\u200c\u200d\u2060\ufeff"}, "The prompt is empty"),
        ("only whitespace", {"prompt": " \n\t\u3000 "}, "The prompt is empty"),
        ("RTL override", {"prompt": "a cat \u202egnp.exe seed 1"}, RESULT),
        ("NUL", {"prompt": "a\x00cat"}, "The prompt contains a NUL character: remove it."),
        ("NUL in the negative", {"prompt": "a cat", "negative": "\x00"}, "The negative prompt contains a NUL"),
        ("SQL quotes", {"prompt": "'); DROP TABLE generations; --"}, RESULT),
        ("SQL in a string", {"prompt": "Robert\"); DELETE FROM generations WHERE ('1'='1"}, RESULT),
        ("emoji only", {"prompt": "🐱🚀🌈👩‍👩‍👧‍👦"}, RESULT),
        ("steps 10000", {"prompt": "a cat", "steps": 10_000}, "Steps must be between 1 and 150, not 10000."),
        ("steps 100 (over this bot's limit)", {"prompt": "a cat", "steps": 100}, "Steps can be at most 50 here"),
        ("steps -5", {"prompt": "a cat", "steps": -5}, "Steps must be between 1 and 150, not -5."),
        ("count 0", {"prompt": "a cat", "count": 0}, "Count must be between 1 and 4, not 0."),
        ("count 1000", {"prompt": "a cat", "count": 1000}, "Count must be between 1 and 4, not 1000."),
        ("seed -1", {"prompt": "a cat", "seed": -1}, "The seed must be between 0 and 4294967295, not -1."),
        ("seed 2**53", {"prompt": "a cat", "seed": 2**53}, "The seed must be between 0 and 4294967295"),
        ("seed 2**64, past Discord's own cap", {"prompt": "a cat", "seed": 2**64}, "The seed must be between 0"),
        ("guidance -1", {"prompt": "a cat", "guidance": -1.0}, "Guidance must be between 0 and 30, not -1.0."),
        ("guidance 1e308", {"prompt": "a cat", "guidance": 1e308}, "Guidance must be between 0 and 30"),
        ("unknown scheduler", {"prompt": "a cat", "scheduler": "'; DROP TABLE x; --"}, "Unknown scheduler"),
        ("scheduler @everyone", {"prompt": "a cat", "scheduler": "@everyone" * 500}, "Unknown scheduler '@\u200b"),
        ("unknown size", {"prompt": "a cat", "size": "gigantic"}, "Unknown size 'gigantic': use one of square"),
    ]


async def test_abusive_prompts_and_options_get_a_picture_or_one_sentence(harness: Harness) -> None:
    fake = harness.fake
    cases = prompt_cases(fake)

    def case(options: dict[str, Any]) -> Callable[[], Any]:
        async def run() -> str:
            inter = await fake.slash_command("imagine", options)
            got = await end_of(inter)
            await check_row(harness, fake.alice.id, options["prompt"], got)
            if got == RESULT:  # the prompt is echoed inert: escaped, one line, no bidi control
                end = await inter.wait_message(is_end)
                echoed = end.content.split("\n> ", 1)[1]
                assert "\n" not in echoed and "\u202e" not in echoed and "```" not in echoed, echoed
            return got

        return run

    async with harness.running():
        generations = [(name, expected, case(options)) for name, options, expected in cases]
        # Numbers outside the ranges of the other commands: refused, or answered as if in range.
        first = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a first picture"}))
        gen_id = result_id(first)
        others: list[tuple[str, dict[str, Any], str]] = [
            ("reroll", {"id": -1}, "You have no generation #-1 here: /history lists yours"),
            ("reroll", {"id": 2**64}, f"You have no generation #{2**64} here: /history lists yours"),
            ("cancel", {"id": 2**64}, f"#{2**64} is not queued or running."),
            ("history", {"page": -3}, RESULT),  # the nearest page: a listing, not a refusal
            ("history", {"page": 2**64}, RESULT),
        ]

        def other(command: str, options: dict[str, Any]) -> Callable[[], Any]:
            async def run() -> str:
                inter = await fake.slash_command(command, options)
                message = await inter.wait_message(
                    lambda m: m.ephemeral and not m.loading and not m.deleted, timeout=CASE_SECONDS
                )
                if message.content.startswith("Your generations, newest first (page "):
                    return RESULT
                return message.content

            return run

        commands = [(f"/{c} {o}", expected, other(c, o)) for c, o, expected in others]

        async def reroll_with_a_negative_seed() -> str:
            got = await end_of(await fake.slash_command("reroll", {"id": gen_id, "seed": -7}))
            await check_row(harness, fake.alice.id, "a first picture", got)
            return got

        def reply(text: str) -> Callable[[], Any]:
            async def run() -> str:
                message = await fake.user_message(text, author=fake.bob, reply_to=first)
                # The reply is edited from progress (with a Cancel button) into the result, or is the sentence.
                answer = await fake.wait_for(
                    lambda: next(
                        (m for m in fake.messages if m.reference is message and (result_id(m) or not m.components)),
                        None,
                    ),
                    CASE_SECONDS,
                )
                got = RESULT if result_id(answer) is not None else answer.content
                await check_row(harness, fake.bob.id, text, got)
                return got

            return run

        replies = [
            ("reply: mentions", RESULT, reply(f"@everyone <@&{fake.guild.roles[-1].id}> <@{fake.carol.id}> again")),
            ("reply: 3000 characters", "The prompt has 3000 characters", reply("z" * 3000)),
            ("reply: NUL", "The prompt contains a NUL character", reply("a\x00b")),
        ]
        failures = await run_cases(
            [
                *generations,
                *commands,
                (
                    "/reroll with seed -7",
                    "The seed must be between 0 and 4294967295, not -7.",
                    reroll_with_a_negative_seed,
                ),
                *replies,
            ]
        )
        assert len(generations) + len(commands) + 1 + len(replies) >= 20
        assert failures == []
    assert_nobody_pinged(fake)
    # The quotes went in as data: the table is whole and every row reads back as sent.
    rows = await harness.rows_of(fake.alice.id)
    sent = {options["prompt"] for _, options, _ in cases}
    assert sent <= {row.prompt for row in rows}


# ---- properties -----------------------------------------------------------------------------------------------

# Text that hypothesis would rarely build on its own: pings, markdown, bidi controls and NUL, mixed with any text.
HOSTILE_PIECES = [
    "@everyone",
    "@here",
    "<@123456789012345678>",
    "<@!123456789012345678>",
    "<@&123456789012345678>",
    "\u202e",
    "\u2066",
    "**",
    "```",
    "`",
    "\\",
    "_",
    "|",
    "~",
    "> ",
    "# ",
    "-# ",
    "[x](https://e.example)",
    "\n",
    "\x00",
    "\u200b",
]
hostile_text = st.lists(st.one_of(st.sampled_from(HOSTILE_PIECES), st.text(max_size=30)), max_size=60).map("".join)
BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@settings(max_examples=300, deadline=None)
@given(prompt=hostile_text, seeds=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4))
def test_any_prompt_is_echoed_inert(prompt: str, seeds: list[int]) -> None:
    content = render.result_text(1, prompt, seeds=seeds, width=512, height=512, steps=25, scheduler="ddim")
    assert len(content) <= render.MAX_CONTENT
    assert content.count("\n") == 1  # the header, then the prompt on one line
    assert PING.search(content) is None
    assert not BIDI & set(content)
    line = render.history_line(1, prompt, 5, "done", "<t:0:R>")
    assert "\n" not in line and PING.search(line) is None and not BIDI & set(line)
    assert PING.search(plain(f"Unknown scheduler {prompt!r}.")) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=hostile_text,
    negative=hostile_text,
    scheduler=st.one_of(st.sampled_from(sdengine.SCHEDULERS), st.text(max_size=100)),
    steps=st.integers(-(2**70), 2**70),
    guidance=st.floats(allow_nan=True, allow_infinity=True),
    count=st.integers(-(2**70), 2**70),
    seed=st.one_of(st.none(), st.integers(-(2**70), 2**70)),
    width=st.one_of(st.none(), st.integers(-(2**20), 2**20)),
)
def test_check_inputs_accepts_or_says_one_sentence(
    tiny: sdengine.Model,
    prompt: str,
    negative: str,
    scheduler: str,
    steps: int,
    guidance: float,
    count: int,
    seed: int | None,
    width: int | None,
) -> None:
    request = sdengine.GenerationRequest(
        prompt,
        negative=negative,
        scheduler=scheduler,
        steps=steps,
        guidance=guidance,
        count=count,
        seed=seed,
        width=width,
    )
    try:
        sdengine.check_inputs(tiny, request)
    except sdengine.InvalidRequest as exc:
        assert one_sentence(str(exc)), str(exc)
    else:  # accepted only when every value is in range
        assert 1 <= steps <= 150 and 0 <= guidance <= 30 and 1 <= count <= 4 and scheduler in sdengine.SCHEDULERS
