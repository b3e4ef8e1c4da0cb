"""Random-weight Stable Diffusion models built in memory, for tests, benchmarks and offline smoke runs.

`tiny` (SD 1.x), `tiny-xl` (SDXL: two text encoders, added time conditioning) and `tiny-v` (SD 2.x with
v-prediction) are deterministic and small enough for CPU tests; their pictures are noise. `sd15` has the shapes
and cost of Stable Diffusion 1.5 (860M-parameter UNet) with random weights, for benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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
# Stable Diffusion 2 (768-v) predicts the velocity v = alpha_t * eps - sigma_t * x_0 (Salimans & Ho 2022, eq. 9).
SD2_V_SCHEDULER_CONFIG: dict[str, Any] = {
    **SD15_SCHEDULER_CONFIG,
    "_class_name": "DDIMScheduler",
    "prediction_type": "v_prediction",
}
# The scheduler config shipped with SDXL base 1.0.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    **SD15_SCHEDULER_CONFIG,
    "_class_name": "EulerDiscreteScheduler",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SHAPES = ("tiny", "tiny-xl", "tiny-v", "sd15")


def byte_level_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level vocabulary and no merges: every character is a token.

    SDXL's second tokenizer pads with "!" rather than with the end token: `pad_token` builds that one.
    """
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
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token=pad_token)


def _text_config(tokenizer: CLIPTokenizer, **config: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=tokenizer.model_max_length,
        **config,
    )


def _text_encoder(tokenizer: CLIPTokenizer, **config: Any) -> CLIPTextModel:
    return CLIPTextModel(_text_config(tokenizer, **config))


# The text encoder and UNet of the tiny shapes, as in diffusers' own pipeline tests.
_TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
}
_TINY_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 32,
}
# SD 2.x and SDXL: linear projections in the transformer blocks and per-block attention heads.
_TINY_UNET_V2 = {**_TINY_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True}


def _tiny_xl(tokenizer: CLIPTokenizer, vae_blocks: int) -> dict[str, Any]:
    """SDXL in miniature: the UNet also takes the pooled embedding of the second encoder and 6 time ids."""
    tokenizer_2 = byte_level_tokenizer(pad_token="!")
    text = {**_TINY_TEXT, "vocab_size": len(tokenizer), "hidden_act": "gelu"}
    hidden_size, time_embed_dim, projection_dim = _TINY_TEXT["hidden_size"], 8, 32
    return {
        "tokenizer": tokenizer,
        "text_encoder": _text_encoder(tokenizer, **text),
        "tokenizer_2": tokenizer_2,
        "text_encoder_2": CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=projection_dim, **text)),
        "unet": UNet2DConditionModel(
            **_TINY_UNET_V2,
            cross_attention_dim=2 * hidden_size,  # both encoders' hidden states, concatenated
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        ),
        "vae": _vae((32, 64, 64, 64)[:vae_blocks], layers_per_block=1, sample_size=64, force_upcast=True),
        "scheduler_config": dict(SDXL_SCHEDULER_CONFIG),
        "kind": "sdxl",
    }


def _vae(
    block_out_channels: tuple[int, ...], layers_per_block: int, sample_size: int, force_upcast: bool = False
) -> AutoencoderKL:
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
        force_upcast=force_upcast,  # SDXL's VAE overflows in fp16, so its pipeline decodes in fp32
    )


def build_components(shape: str = "tiny", *, seed: int = 0, vae_blocks: int = 2) -> dict[str, Any]:
    """Build the components of a `Model` with random weights: tokenizer(s), text encoder(s), UNet, VAE,
    scheduler config and kind.

    `vae_blocks` sets the VAE's downscale factor to 2 ** (vae_blocks - 1) for the tiny shapes.
    The global torch RNG is left untouched.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown random model shape {shape!r}: use one of {', '.join(SHAPES)}")
    tokenizer = byte_level_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if shape == "tiny-xl":
            parts = _tiny_xl(tokenizer, vae_blocks)
        elif shape == "sd15":
            parts = {
                "text_encoder": _text_encoder(
                    tokenizer,
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_attention_heads=12,
                    num_hidden_layers=12,
                    hidden_act="quick_gelu",
                ),
                "unet": UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
                "vae": _vae((128, 256, 512, 512), layers_per_block=2, sample_size=512),
            }
        else:  # tiny (SD 1.x) and tiny-v (SD 2.x: OpenCLIP's gelu, linear projections, v-prediction)
            v = shape == "tiny-v"
            text = {**_TINY_TEXT, "vocab_size": len(tokenizer), **({"hidden_act": "gelu"} if v else {})}
            parts = {
                "text_encoder": _text_encoder(tokenizer, **text),
                "unet": UNet2DConditionModel(**(_TINY_UNET_V2 if v else _TINY_UNET), cross_attention_dim=32),
                "vae": _vae((32, 64, 64, 64)[:vae_blocks], layers_per_block=1, sample_size=64),
            }
            if v:
                parts.update(scheduler_config=dict(SD2_V_SCHEDULER_CONFIG), kind="sd2")
    parts.setdefault("tokenizer", tokenizer)
    parts.setdefault("scheduler_config", dict(SD15_SCHEDULER_CONFIG))
    parts.setdefault("kind", "sd1")
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        if name in parts:
            parts[name].eval()
    return parts
