"""Speed and memory transforms applied to a model from outside (the model itself stays plain)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from onebox.device import quiet_optional_imports
from onebox.errors import OneboxError
from onebox.model import Transformer, cross_entropy_loss
from onebox.moe import balance_loss

COMPILE_SCOPES = ("block", "model")
LossFn = Callable[[Tensor, Tensor], Tensor]


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
    the model is; state dict keys stay unprefixed.
    """
    for block in model.layers:
        block.compile()


def apply_float8(model: Transformer, device: torch.device, recipe: str = "tensorwise", emulate: bool = False) -> None:
    """Run the blocks' linear layers as FP8 matrix products (torchao's float8 training), in place.

    Weights, gradients and optimizer state stay as they were (fp32 master weights); each product casts
    its operands to float8 with dynamic scales (per tensor, or per row with recipe 'rowwise'). The
    output projection and embedding stay in bf16, as torchtitan does. Parameter names are unchanged.
    `emulate` computes the same casts with a bf16 product, for tests on machines without FP8 units.
    """
    if not emulate and not (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)):
        raise OneboxError(
            f"--precision fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper or newer); "
            f"this run is on {device}. Use --precision bf16 (or auto)."
        )
    quiet_optional_imports()  # float8 training needs none of torchao's optional compiled kernels
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise OneboxError(
            "--precision fp8 needs torchao: pip install 'onebox[fp8]' (or pip install torchao), or use --precision bf16."
        ) from None
    config = Float8LinearConfig.from_recipe_name(recipe)
    config = dataclasses.replace(config, emulate=emulate)

    def eligible(module: torch.nn.Module, name: str) -> bool:  # FP8 products need dimensions divisible by 16
        return (
            name.startswith("layers.")
            and isinstance(module, torch.nn.Linear)
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    convert_to_float8_training(model, module_filter_fn=eligible, config=config)


def compile_scope(setting: str, device: torch.device) -> str | None:
    """Resolve the compile setting to a scope ('block', 'model') or None for eager.

    auto compiles on CUDA only (on CPU compiling costs more than it saves here); on picks 'block'.
    """
    if setting == "auto":
        return "block" if device.type == "cuda" else None
    if setting == "on":
        return "block"
    return setting if setting in COMPILE_SCOPES else None


def training_loss(model: Transformer, scope: str | None) -> LossFn:
    """The function (tokens, targets) -> mean loss that training differentiates.

    None runs eagerly; 'block' compiles each block and, separately, the output projection with the
    loss (so the fp32 logits are never written out); 'model' compiles forward and loss as one graph
    (longest compile, every op fusable).
    """

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return with_router_losses(cross_entropy_loss(model(x), y))

    def with_router_losses(
        value: Tensor,
    ) -> Tensor:  # a mixture of experts' balance losses, where its config weighs them
        extra = balance_loss([b.mlp for b in model.layers], model.config) if model.config.experts else None
        return value if extra is None else value + extra

    if scope is None:
        return loss
    if scope == "model":
        return torch.compile(loss)
    apply_compile(model)
    head = torch.compile(lambda hidden, y: cross_entropy_loss(model.logits(hidden), y))
    return lambda x, y: with_router_losses(head(model.hidden_states(x), y))
