"""The optional NSFW check: diffusers' `StableDiffusionSafetyChecker`, the one SD 1.x folders ship in `safety_checker/`.

It only reports. `check` says which images it flags, and the caller decides what to do with them: the bot blacks
them out outside age-restricted channels. The checker compares a CLIP image embedding with fixed concept embeddings;
it misses some images and flags some harmless ones, so it is a filter, not a guarantee.

    checker = SafetyChecker.load(folder, device, dtype)   # None when the folder has no checker
    flags = checker.check(images)                         # one bool per image
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessorPil

log = logging.getLogger(__name__)

CHECKER_FOLDER = "safety_checker"
PROCESSOR_FOLDER = "feature_extractor"


@dataclass
class SafetyChecker:
    """The checker model and the CLIP image processor that prepares its input."""

    model: StableDiffusionSafetyChecker
    processor: CLIPImageProcessorPil

    @staticmethod
    def available(folder: Path) -> bool:
        """Whether a diffusers model folder holds a safety checker and its feature extractor."""
        return (folder / CHECKER_FOLDER).is_dir() and (folder / PROCESSOR_FOLDER).is_dir()

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker | None:
        """The checker saved in `folder`, on `device`; None when the folder has none."""
        if not cls.available(folder):
            return None
        # The PIL processor: the default CLIPImageProcessor needs torchvision, which this project does not install.
        processor = CLIPImageProcessorPil.from_pretrained(folder / PROCESSOR_FOLDER)
        model = StableDiffusionSafetyChecker.from_pretrained(folder / CHECKER_FOLDER, torch_dtype=dtype)
        model.to(device).eval().requires_grad_(False)
        log.info("loaded the safety checker from %s", folder)
        return cls(model, processor)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder / CHECKER_FOLDER)
        self.processor.save_pretrained(folder / PROCESSOR_FOLDER)

    @torch.inference_mode()
    def check(self, images: list[Image.Image]) -> list[bool]:
        """One flag per image: True where the checker finds an NSFW concept."""
        if not images:
            return []
        model = self.model
        pixels = self.processor(images=images, return_tensors="pt").pixel_values  # (N, 3, S, S)
        pixels = pixels.to(device=model.device, dtype=model.dtype)
        # The checker blacks out flagged entries of `images` in place: give it copies, keep only its flags.
        arrays = [np.asarray(image, dtype=np.float32) for image in images]
        _, flags = model(images=arrays, clip_input=pixels)
        return [bool(flag) for flag in flags]
