"""Prompt text -> CLIP embeddings, with A1111-style weights and no silent truncation.

Plain prompts that fit the text encoder's window are encoded exactly as diffusers does. Prompts with weighting
syntax, or longer than the window, go through compel, which parses weights and encodes long prompts in
chunks of the window, as A1111 does.

SD 1.x and 2.x condition on the last (normalized) hidden states of one text encoder. SDXL concatenates the
penultimate (unnormalized) hidden states of its two encoders, and also takes the pooled, projected output of
the second one.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import CLIPTokenizer

from .errors import InvalidRequest
from .lora import activate_text, text_loras
from .loratags import Loras
from .models import Model

PROMPT_CACHE_SIZE = 64  # (prompt, negative) pairs kept per model: a few MiB of embeddings for SD 1.5

# A1111 writes a weight as `(text:1.3)`; compel reads the same as `(text)1.3`.
_A1111_WEIGHT = re.compile(r"\(([^():]+):\s*([0-9]*\.?[0-9]+)\s*\)")
# Anything compel would read as weighting: brackets, `word+`, `word-`, `.and(`, `.blend(`.
_WEIGHTING = re.compile(r"[()\[\]+]|-(?=[\s,]|$)|\.(?:and|blend)\(")


def to_compel_syntax(prompt: str) -> str:
    return _A1111_WEIGHT.sub(r"(\1)\2", prompt)


@dataclass
class PromptEmbeddings:
    """The negative and the positive prompt, encoded together."""

    embeds: torch.Tensor  # (2, T, D) as [negative, positive]; T is 77 or a multiple of it for long prompts
    pooled: torch.Tensor | None = None  # SDXL: (2, P), the second encoder's projected output; else None
    notices: list[str] = field(default_factory=list)


def encode_prompts(model: Model, prompt: str, negative: str) -> tuple[torch.Tensor, list[str]]:
    """The (2, T, D) embeddings ordered [negative, positive], and notices for the user."""
    encoded = encode_prompt_pair(model, prompt, negative)
    return encoded.embeds, encoded.notices


def encode_prompt_pair(model: Model, prompt: str, negative: str, loras: Loras = ()) -> PromptEmbeddings:
    """Encode the negative and the positive prompt together, for any kind of model, through the model's cache of
    the last `PROMPT_CACHE_SIZE` pairs. The cached tensors are shared: callers slice and concatenate them, never
    write into them. `prompt` is the text without LoRA tags; `loras` are the adapters (known to the model) it runs
    with, of which those that change a text encoder are on while it encodes, and part of the cache key.

    T is the encoder's window (77) for prompts that fit it and a multiple of it for longer ones.
    """
    cache, key = model.prompt_cache, (prompt, negative, text_loras(model, loras))
    hit: PromptEmbeddings | None = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return replace(hit, notices=list(hit.notices))
    activate_text(model, loras)
    with _encoders_on_device(model):
        encoded = _encode(model, prompt, negative)
    cache[key] = replace(encoded, notices=list(encoded.notices))
    while len(cache) > PROMPT_CACHE_SIZE:
        cache.popitem(last=False)
    return encoded


@contextlib.contextmanager
def _encoders_on_device(model: Model) -> Iterator[None]:
    """With `memory = "low"` the text encoders wait on the CPU; they come to the GPU only while they encode."""
    offloaded = model.memory == "low" and model.device.type != "cpu"
    if offloaded:
        for encoder in model.text_encoders:
            encoder.to(model.device)
    try:
        yield
    finally:
        if offloaded:
            for encoder in model.text_encoders:
                encoder.to("cpu")


def _encode(model: Model, prompt: str, negative: str) -> PromptEmbeddings:
    window = int(model.tokenizer.model_max_length)
    texts = [negative, prompt]
    plain = not any(_WEIGHTING.search(t) for t in texts)
    if plain and all(len(ids) <= window for ids in model.tokenizer(texts).input_ids):
        encoded = _encode_plain(model, texts)
    else:
        encoded = _encode_with_compel(model, texts)
        if encoded.embeds.shape[1] > window:
            chunks = encoded.embeds.shape[1] // window
            encoded.notices.append(f"The prompt is longer than {window} tokens, so it was encoded in {chunks} chunks.")
    if not negative and model.force_zeros_for_empty_prompt:
        # SDXL was trained with zeros, not the encoding of "", for a missing negative prompt
        assert encoded.pooled is not None
        encoded.embeds = torch.cat([torch.zeros_like(encoded.embeds[:1]), encoded.embeds[1:]])
        encoded.pooled = torch.cat([torch.zeros_like(encoded.pooled[:1]), encoded.pooled[1:]])
    return encoded


@torch.inference_mode()
def _encode_plain(model: Model, texts: list[str]) -> PromptEmbeddings:
    if model.tokenizer_2 is None or model.text_encoder_2 is None:
        embeds: torch.Tensor = model.text_encoder(_token_ids(model.tokenizer, texts, model))[0]  # (2, 77, D)
        return PromptEmbeddings(embeds)
    first = model.text_encoder(_token_ids(model.tokenizer, texts, model), output_hidden_states=True)
    second = model.text_encoder_2(_token_ids(model.tokenizer_2, texts, model), output_hidden_states=True)
    # The penultimate layer, before the final layer norm: (2, 77, D_1) and (2, 77, D_2)
    hidden = [first.hidden_states[-2], second.hidden_states[-2]]
    pooled = second.text_embeds  # (2, P): the end token's state, projected
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)  # (2, 77, D_1 + D_2)


def _token_ids(tokenizer: CLIPTokenizer, texts: list[str], model: Model) -> torch.Tensor:
    ids: torch.Tensor = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (2, 77)
    return ids.to(model.device)


def _encode_with_compel(model: Model, texts: list[str]) -> PromptEmbeddings:
    from compel import Compel, ReturnedEmbeddingsType  # imported late: it pulls in many diffusers pipelines

    texts = [to_compel_syntax(t) for t in texts]
    options = {
        "truncate_long_prompts": False,
        "dtype_for_device_getter": lambda _device: model.dtype,
        "device": str(model.device),
    }
    try:
        with torch.inference_mode():
            if model.tokenizer_2 is None or model.text_encoder_2 is None:
                return PromptEmbeddings(Compel(model.tokenizer, model.text_encoder, **options)(texts))
            # SDXL: each encoder through its own compel, then concatenated as in the plain path
            penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            hidden = [
                Compel(tokenizer, encoder, returned_embeddings_type=penultimate, **options)(texts)
                for tokenizer, encoder in (
                    (model.tokenizer, model.text_encoder),
                    (model.tokenizer_2, model.text_encoder_2),
                )
            ]
            # The two tokenizers share one vocabulary, so they chunk a long prompt alike.
            assert hidden[0].shape[1] == hidden[1].shape[1]
            words = [_words(Compel, t) for t in texts]
            pooled = model.text_encoder_2(_token_ids(model.tokenizer_2, words, model)).text_embeds  # (2, P)
    except Exception as exc:  # compel's parser raises assorted errors on odd syntax
        raise InvalidRequest(
            "The prompt's weighting syntax could not be read: balance the brackets, e.g. `(red:1.2)`."
        ) from exc
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def _words(compel: Any, text: str) -> str:
    """The prompt's words without the weighting syntax, for SDXL's pooled embedding.

    compel would pool the text with its syntax as written, brackets and numbers included. The pooled embedding
    is one vector for the whole prompt, the end token's state: like diffusers and A1111, it sees the first window
    of tokens, while the per-token embeddings carry the whole prompt.
    """
    words: list[str] = []

    def walk(node: Any) -> None:
        if hasattr(node, "text"):  # Fragment
            words.append(node.text)
        for child in getattr(node, "prompts", getattr(node, "children", [])):  # Conjunction, Blend, FlattenedPrompt
            walk(child)

    walk(compel.parse_prompt_string(text))
    return " ".join(words)
