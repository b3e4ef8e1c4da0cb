"""The engine requests the bot runs that it does not read from a command's options: a stored generation's again
(reroll, upscale, resume, the redraw of a lost image), and a variation's of an image.

Models and LoRA adapters can leave the config between a generation and its rerun: `stored_request` says in a
sentence what went missing, and the run goes on without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import sdengine
from bot.config import Settings
from bot.replies import UserError
from bot.rows import Generation
from sdengine.loratags import parse_lora_tags, without_loras


class Requests:
    """Builds requests from stored rows and the settings, for the models this bot serves."""

    def __init__(self, settings: Settings, models: Mapping[str, sdengine.ModelInfo]) -> None:
        self.settings = settings
        self.models = models

    def stored_request(self, row: Generation, seed: int) -> tuple[sdengine.GenerationRequest, list[str]]:
        """The request that made `row`, with `seed`, and a sentence for each part of it that is gone (its model,
        a LoRA adapter), which the run goes without."""
        notes = []
        if self.stored_model(row) is None:
            notes.append(
                f"#{row.id} was made with model {row.model!r}, which is no longer here, so this uses the default "
                f"model {self.settings.model.label!r} and the picture will differ."
            )
        request = self.from_row(row, seed=seed)
        gone = self.gone_loras(request)
        if gone:
            request = replace(request, prompt=without_loras(request.prompt, gone))
            notes.append(
                f"#{row.id} used LoRA {', '.join(gone)[:200]}, no longer here, so this runs without it and the "
                "picture will differ."
            )
        return request, notes

    def stored_model(self, row: Generation) -> str | None:
        """The model that made `row`, by the name it was stored with or (for a row from before `[models]`, which
        stored the path) by its path; None if it is no longer configured."""
        if row.model in self.models:
            return row.model
        return next((m.label for m in self.settings.all_models if m.path == row.model), None)

    def gone_loras(self, request: sdengine.GenerationRequest) -> list[str]:
        """The LoRA adapters a stored prompt names that its model no longer has."""
        try:
            loras = parse_lora_tags(request.prompt)[1]
        except sdengine.InvalidRequest:  # a refused request's prompt: rerunning it is refused the same way
            return []
        info = self.models.get(request.model or self.settings.model.label)
        return [name for name, _weight in loras if info is not None and name not in info.loras]

    def model_name(self, name: str | None) -> str:
        """A model a user asked for by name (None: the default), or the sentence that lists the ones there are."""
        if name is None:
            return self.settings.model.label
        if name not in self.models:
            raise UserError(f"There is no model {name[:40]!r} here: pick one of {', '.join(self.models)}.")
        return name

    def from_row(self, row: Generation, *, seed: int) -> sdengine.GenerationRequest:
        """The request that made `row`, with `seed`; a variation keeps its stored init image."""
        if row.strength is not None and row.init_image is None:  # image-to-image, but the image is gone
            raise UserError(
                f"The image that #{row.id} started from is no longer kept: make variations of a picture again."
            )
        return sdengine.GenerationRequest(
            prompt=row.prompt,
            negative=row.negative,
            scheduler=row.scheduler,
            steps=row.steps,
            guidance=row.guidance,
            seed=seed,
            width=row.width,
            height=row.height,
            count=row.count,
            image=row.init_image,
            strength=row.strength if row.strength is not None else self.settings.defaults.strength,
            model=self.stored_model(row) or self.settings.model.label,
            hires_scale=row.hires_scale,
            hires_strength=row.hires_strength or self.settings.defaults.hires_strength,
            hires_steps=row.hires_steps,
            hires_upscaler=row.hires_upscaler or self.settings.defaults.hires_upscaler,
        )

    def variation_request(self, prompt: str, source: Generation | None) -> sdengine.GenerationRequest:
        """Image-to-image from an image (attached later by `run`), with the settings of the generation that made it
        when known, else the defaults. The size follows the image."""
        base = source or self.settings.defaults
        return sdengine.GenerationRequest(
            prompt,
            negative=base.negative,
            scheduler=base.scheduler,
            steps=base.steps,
            guidance=base.guidance,
            seed=sdengine.random_seed(source.count if source else 1),
            count=source.count if source else 1,
            strength=self.settings.defaults.strength,
            model=(self.stored_model(source) if source else None) or self.settings.model.label,
        )


def image_seed(row: Generation, index: int) -> int:
    """The seed of image `index` of `row`: image i of a request uses seed + i."""
    return row.seeds[index] if index < len(row.seeds) else (row.seed or 0) + index
