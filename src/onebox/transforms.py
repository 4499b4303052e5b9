"""Speed and memory transforms applied to a model from outside (the model itself stays plain)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from onebox.model import Transformer


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of keeping them (full checkpointing).

    The blocks' forward is wrapped in place, so parameter names and state dicts are unchanged.
    """
    for block in model.layers:
        original = block.forward

        def forward(*args: Any, _original: Any = original, **kwargs: Any) -> torch.Tensor:
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_compile(model: Transformer) -> None:
    """torch.compile each transformer block in place (torchtitan's choice).

    Identical blocks share one compiled graph, so compile time stays that of one block however deep
    the model is; state dict keys stay unprefixed. Embedding, final norm and loss run eagerly.
    """
    for block in model.layers:
        block.compile()


def should_compile(setting: str, device: torch.device) -> bool:
    """Resolve the compile setting: auto compiles on CUDA only (CPU compile costs more than it saves here)."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"
