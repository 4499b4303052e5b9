"""Rotary position embeddings: the frequencies (plain, or scaled as Llama 3.1 and linear scaling do), their
cos/sin tables, and the rotation, in Hugging Face's rotate-half layout (so export is a renaming)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from onebox.config import ModelConfig


def inverse_frequencies(
    head_dim: int, base: float, config: ModelConfig | None = None, device: torch.device | str | None = None
) -> Tensor:
    """The head_dim / 2 rotation frequencies, fp32: base^(-2i / head_dim), scaled as `config.rope_scaling`
    says (transformers' rope_type: linear divides every frequency by the factor; llama3 divides the low
    ones, keeps the high ones and blends the band between)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    scaling = "none" if config is None else config.rope_scaling
    if scaling == "linear":
        return inv_freq / config.rope_factor
    if scaling == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        original = config.rope_original_context
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rope_tables(
    seq_len: int,
    head_dim: int,
    base: float,
    device: torch.device | str | None = None,
    config: ModelConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape (seq_len, head_dim), fp32, Hugging Face Llama layout (scaled as `config` says)."""
    inv_freq = inverse_frequencies(head_dim, base, config, device)
    positions = torch.arange(seq_len, dtype=torch.int64, device=device).float()
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def model_rope_tables(config: ModelConfig, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """A model's tables: its context, head size, base and scaling."""
    return rope_tables(config.seq_len, config.head_size, config.rope_base, device, config)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, head_dim) by the angles of its positions (cos, sin: (T, head_dim), or (B, T, head_dim)
    when each row has its own positions)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos + rotated * sin
