"""Prompt text -> CLIP embeddings, with A1111-style weights and no silent truncation (via compel)."""

from __future__ import annotations

import re

import torch

from .errors import InvalidRequest
from .models import Model

# A1111 writes a weight as `(text:1.3)`; compel reads the same as `(text)1.3`.
_A1111_WEIGHT = re.compile(r"\(([^():]+):\s*([0-9]*\.?[0-9]+)\s*\)")


def to_compel_syntax(prompt: str) -> str:
    return _A1111_WEIGHT.sub(r"(\1)\2", prompt)


def encode_prompts(model: Model, prompt: str, negative: str) -> tuple[torch.Tensor, list[str]]:
    """Encode the negative and the positive prompt together.

    Returns embeddings of shape (2, T, D) ordered [negative, positive], where T is 77 for prompts that fit
    the text encoder's window and a multiple of it for longer ones (encoded in chunks, as A1111 does),
    and notices for the user.
    """
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
            embeds: torch.Tensor = compel([to_compel_syntax(negative), to_compel_syntax(prompt)])
    except Exception as exc:  # compel's parser raises assorted errors on odd syntax
        raise InvalidRequest(
            "The prompt's weighting syntax could not be read: balance the brackets, e.g. `(red:1.2)`."
        ) from exc
    notices = []
    window = int(model.tokenizer.model_max_length)
    if embeds.shape[1] > window:
        chunks = embeds.shape[1] // window
        notices.append(f"The prompt is longer than {window} tokens, so it was encoded in {chunks} chunks.")
    return embeds, notices
