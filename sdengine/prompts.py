"""Prompt text -> CLIP embeddings, with A1111-style weights and no silent truncation.

Plain prompts that fit the text encoder's window are encoded exactly as diffusers does. Prompts with weighting
syntax, or longer than the window, go through compel, which parses weights and encodes long prompts in
chunks of the window, as A1111 does.
"""

from __future__ import annotations

import re

import torch

from .errors import InvalidRequest
from .models import Model

# A1111 writes a weight as `(text:1.3)`; compel reads the same as `(text)1.3`.
_A1111_WEIGHT = re.compile(r"\(([^():]+):\s*([0-9]*\.?[0-9]+)\s*\)")
# Anything compel would read as weighting: brackets, `word+`, `word-`, `.and(`, `.blend(`.
_WEIGHTING = re.compile(r"[()\[\]+]|-(?=[\s,]|$)|\.(?:and|blend)\(")


def to_compel_syntax(prompt: str) -> str:
    return _A1111_WEIGHT.sub(r"(\1)\2", prompt)


def encode_prompts(model: Model, prompt: str, negative: str) -> tuple[torch.Tensor, list[str]]:
    """Encode the negative and the positive prompt together.

    Returns embeddings of shape (2, T, D) ordered [negative, positive], where T is the encoder's window (77)
    for prompts that fit it and a multiple of it for longer ones, and notices for the user.
    """
    window = int(model.tokenizer.model_max_length)
    texts = [negative, prompt]
    plain = not any(_WEIGHTING.search(t) for t in texts)
    if plain and all(len(ids) <= window for ids in model.tokenizer(texts).input_ids):
        return _encode_plain(model, texts), []
    embeds = _encode_with_compel(model, texts)
    notices = []
    if embeds.shape[1] > window:
        chunks = embeds.shape[1] // window
        notices.append(f"The prompt is longer than {window} tokens, so it was encoded in {chunks} chunks.")
    return embeds, notices


@torch.inference_mode()
def _encode_plain(model: Model, texts: list[str]) -> torch.Tensor:
    ids = model.tokenizer(
        texts, padding="max_length", max_length=model.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (2, 77)
    embeds: torch.Tensor = model.text_encoder(ids.to(model.device))[0]  # (2, 77, D)
    return embeds


def _encode_with_compel(model: Model, texts: list[str]) -> torch.Tensor:
    from compel import Compel  # imported late: it pulls in many diffusers pipelines

    compel = Compel(
        tokenizer=model.tokenizer,
        text_encoder=model.text_encoder,
        truncate_long_prompts=False,
        dtype_for_device_getter=lambda _device: model.dtype,
        device=str(model.device),
    )
    try:
        with torch.inference_mode():
            embeds: torch.Tensor = compel([to_compel_syntax(t) for t in texts])
    except Exception as exc:  # compel's parser raises assorted errors on odd syntax
        raise InvalidRequest(
            "The prompt's weighting syntax could not be read: balance the brackets, e.g. `(red:1.2)`."
        ) from exc
    return embeds
