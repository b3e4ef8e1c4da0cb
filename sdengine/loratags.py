"""A1111's LoRA tags, `<lora:name:weight>`, read from a prompt. Torch-free, so the bot can read them too.

The tags pick adapters and are removed from the text that is encoded, exactly as A1111 removes them; the prompt
as written, tags included, is what is stored, shown and written into the PNG's infotext, so a reroll of the
stored prompt brings the same adapters back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection

from .errors import InvalidRequest

MAX_LORA_WEIGHT = 2.0
# A1111's extra-network syntax `<kind:arg:arg>`, for the `lora` kind only; other kinds stay in the text.
_TAG = re.compile(r"<lora:([^>]*)>")

Loras = tuple[tuple[str, float], ...]  # (adapter name, weight) in the order the prompt names them


def parse_lora_tags(prompt: str) -> tuple[str, Loras]:
    """The prompt without its `<lora:name[:weight]>` tags, and the tags' (name, weight) pairs (weight 1.0 if
    omitted). Raises `InvalidRequest` for a tag without a name, with a weight that is not a number, with more
    than a weight, or for a name given twice."""
    loras: list[tuple[str, float]] = []
    for match in _TAG.finditer(prompt):
        name, weight = _read_tag(match.group(1))
        if any(name == seen for seen, _ in loras):
            raise InvalidRequest(f"The LoRA {name[:40]!r} is named twice in the prompt: keep one tag.")
        loras.append((name, weight))
    return _TAG.sub("", prompt), tuple(loras)


def without_loras(prompt: str, names: Collection[str]) -> str:
    """The prompt with the tags of the adapters `names` removed, the others kept as written."""
    return _TAG.sub(lambda tag: "" if tag.group(1).split(":")[0].strip() in names else tag.group(0), prompt)


def check_lora_weights(loras: Loras) -> None:
    for name, weight in loras:
        if not -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT:  # also rejects NaN
            raise InvalidRequest(
                f"The weight of LoRA {name[:40]!r} must be between {-MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g}, "
                f"not {weight:g}."
            )


def _read_tag(body: str) -> tuple[str, float]:
    name, *rest = (part.strip() for part in body.split(":"))
    if not name:
        raise InvalidRequest("A `<lora:…>` tag has no name: write it as `<lora:name:0.8>`.")
    if len(rest) > 1:
        raise InvalidRequest(f"The tag of LoRA {name[:40]!r} has too many parts: write it as `<lora:name:0.8>`.")
    if not rest:
        return name, 1.0
    try:
        weight = float(rest[0])
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise InvalidRequest(f"The weight of LoRA {name[:40]!r} is not a number: write it as `<lora:name:0.8>`.")
    return name, weight
