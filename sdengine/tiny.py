"""Random-weight Stable Diffusion models built in memory, for tests, benchmarks and offline smoke runs.

`tiny` is deterministic and small enough for CPU tests; its pictures are noise. `sd15` has the shapes and
cost of Stable Diffusion 1.5 (860M-parameter UNet) with random weights, for benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The scheduler config shipped with Stable Diffusion 1.5.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}


def byte_level_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level vocabulary and no merges: every character is a token."""
    # The printable bytes map to themselves and the rest to code points from 256 up, as in GPT-2/CLIP BPE.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _text_encoder(tokenizer: CLIPTokenizer, **config: Any) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=tokenizer.model_max_length,
            **config,
        )
    )


def _vae(block_out_channels: tuple[int, ...], layers_per_block: int, sample_size: int) -> AutoencoderKL:
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=min(32, block_out_channels[0]),
        sample_size=sample_size,
    )


def build_components(shape: str = "tiny", *, seed: int = 0, vae_blocks: int = 2) -> dict[str, Any]:
    """Build tokenizer, text encoder, UNet, VAE and scheduler config with random weights.

    `vae_blocks` sets the VAE's downscale factor to 2 ** (vae_blocks - 1) for the `tiny` shape.
    The global torch RNG is left untouched.
    """
    tokenizer = byte_level_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if shape == "tiny":
            text_encoder = _text_encoder(
                tokenizer,
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=5,
            )
            unet = UNet2DConditionModel(
                sample_size=32,
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32,
                norm_num_groups=32,
            )
            vae = _vae((32, 64, 64, 64)[:vae_blocks], layers_per_block=1, sample_size=64)
        elif shape == "sd15":
            text_encoder = _text_encoder(
                tokenizer,
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                hidden_act="quick_gelu",
            )
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
            vae = _vae((128, 256, 512, 512), layers_per_block=2, sample_size=512)
        else:
            raise ValueError(f"unknown random model shape {shape!r}: use 'tiny' or 'sd15'")
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.eval(),
        "unet": unet.eval(),
        "vae": vae.eval(),
        "scheduler_config": dict(SD15_SCHEDULER_CONFIG),
    }
