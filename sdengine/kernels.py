"""Kernel settings applied once a model is loaded: `channels_last` and `fuse_qkv`. Neither changes the pictures
beyond float rounding (tests/test_kernels.py holds them to 1/255).

- `channels_last` stores the UNet's and the VAE's 4-D weights as NHWC. cuDNN's fast convolution kernels (tensor
  cores in fp16/bf16) want NHWC; given NCHW weights they transpose around every convolution. The latents stay
  contiguous: a convolution with an NHWC weight returns NHWC, so the first one converts them.
- `fuse_qkv` concatenates each self-attention's query, key and value projections into one matrix (key and value
  for cross-attention): one bigger matmul instead of three small ones. diffusers keeps the separate projections
  beside the fused one (in fp16 107 MiB for SD 1.5's UNet, measured; about 1.2 GiB for SDXL's); here they are views of
  the fused matrix's rows, so fusing costs no memory and the separate ones still work for whatever calls them.

`None` is "auto": on for CUDA, where both are known to help, and off elsewhere: on a CPU neither gained beyond noise
(bench/kernel_settings.py, SD-1.5 shape at 256x256: 1.00x and 1.07x).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import Attention

if TYPE_CHECKING:
    from .models import Model

log = logging.getLogger(__name__)


def resolve(setting: bool | None, device: torch.device) -> bool:
    """What a tri-state setting means on `device`: `None` (auto) is on for CUDA only."""
    return device.type == "cuda" if setting is None else setting


def apply_kernels(model: Model, channels_last: bool | None = None, fuse_qkv: bool | None = None) -> None:
    """Set the model's UNet and VAE up for the two settings; `load_model` calls it before any compiling, which
    would otherwise trace the unfused attention and NCHW weights."""
    if resolve(channels_last, model.device):
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
        model.channels_last = True
    if not resolve(fuse_qkv, model.device):
        return
    if model.loras:
        # peft wraps to_q, to_k and to_v; the fused processor calls to_qkv instead, so every LoRA would do nothing.
        log.info("fuse_qkv is off for %r: its LoRA adapters change the separate q/k/v projections", model.name)
    elif model.memory == "low":
        # Sliced attention replaces the fused processor (it calls to_q, to_k, to_v), so fusing would only add weights.
        log.info("fuse_qkv is off for %r: memory 'low' slices attention, which the fused weights cannot", model.name)
    else:
        for part in (model.unet, model.vae):
            part.fuse_qkv_projections()
            _share_fused_weights(part)
        model.fused_qkv = True


def _share_fused_weights(module: torch.nn.Module) -> None:
    """Make each fused attention's separate projections views of its fused matrix: the same values, no copy."""
    for attn in module.modules():
        if not isinstance(attn, Attention) or not attn.fused_projections:
            continue
        # Self-attention fuses q, k, v (in that order, as rows); cross-attention fuses k and v, and keeps its q.
        fused, parts = (
            (attn.to_kv, [attn.to_k, attn.to_v])
            if attn.is_cross_attention
            else (attn.to_qkv, [attn.to_q, attn.to_k, attn.to_v])
        )
        row = 0
        for linear in parts:
            rows = slice(row, row + linear.out_features)
            linear.weight = torch.nn.Parameter(fused.weight[rows], requires_grad=False)
            if linear.bias is not None:
                linear.bias = torch.nn.Parameter(fused.bias[rows], requires_grad=False)
            row += linear.out_features
