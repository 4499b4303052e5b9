"""AdamW whose update on CUDA is one Triton kernel per parameter, moving the fewest bytes AdamW can.

The training step's default optimizer on CUDA. torch's fused AdamW is the reference: the same
arithmetic (decoupled weight decay, bias correction, eps outside the square root, all in fp32), the
same state (exp_avg, exp_avg_sq, step), so checkpoints move between the two. What differs is traffic:
onebox applies the clip factor as AdamW's grad_scale (optim.OptimizerSet.step), and torch's fused
kernel then writes every unscaled gradient back, 32 bytes a parameter in all; this kernel reads the
weight, gradient and two moments and writes the weight and moments, 28 bytes, and does it at a higher
share of the memory bandwidth (figures: docs/perf/training-h100-2026-11.md). Elsewhere (CPU, MPS,
sharded DTensor parameters) `make_adamw` returns torch's own AdamW.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from onebox.distributed import DTensor

try:  # Triton comes with PyTorch's CUDA builds; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 2048  # elements per program: 16 fp32 values a thread at 4 warps, loaded as 16-byte vectors

if triton is not None:

    @triton.jit
    def _adamw_kernel(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        scale_ptr,
        n,
        decay,
        beta1,
        beta2,
        step_size,
        bias2_sqrt,
        eps,
        SCALED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if SCALED:  # torch's grad_scale: the gradient divided by it as it is read
            g = g / tl.load(scale_ptr)
        p = p * decay
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
        tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


def adamw_update(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: Tensor | None = None,
) -> None:
    """One AdamW update of p and its moments in place, by the Triton kernel (any device Triton runs on,
    its interpreter included). All four tensors contiguous and of one size; grad_scale a one-element tensor."""
    n = p.numel()
    scale = grad_scale if grad_scale is not None else p  # any pointer: unread unless SCALED
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        p,
        grad,
        exp_avg,
        exp_avg_sq,
        scale,
        n,
        1.0 - lr * weight_decay,
        beta1,
        beta2,
        lr / (1.0 - beta1**step),
        (1.0 - beta2**step) ** 0.5,
        eps,
        SCALED=grad_scale is not None,
        BLOCK=BLOCK,
        num_warps=4,
    )


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with its step run by `adamw_update` (see the module's docstring). Takes the clip
    factor as `grad_scale` (a tensor the gradients are divided by), as torch's fused AdamW does."""

    takes_grad_scale = True

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **{k: v for k, v in kwargs.items() if k not in ("fused", "foreach")})
        self.grad_scale: Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("TritonAdamW.step takes no closure")
        scale = None if self.grad_scale is None else torch.as_tensor(self.grad_scale, dtype=torch.float32)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(
                        0.0
                    )  # on the host, as torch's unfused AdamW keeps it: no sync to read it
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                if state["step"].device.type != "cpu":  # resumed from torch's fused AdamW, which keeps it on the device
                    state["step"] = state["step"].cpu()
                state["step"] += 1
                if scale is not None and scale.device != p.device:
                    scale = scale.to(p.device)
                adamw_update(
                    p,
                    p.grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    group["lr"],
                    beta1,
                    beta2,
                    group["eps"],
                    group["weight_decay"],
                    int(state["step"].item()),
                    scale,
                )


def triton_ready(params: list[Tensor]) -> bool:
    """Whether TritonAdamW can step these parameters: Triton present, every one a plain contiguous CUDA
    tensor (sharded DTensors and other devices step with torch's AdamW)."""
    return (
        triton is not None
        and bool(params)
        and all(p.device.type == "cuda" and not isinstance(p, DTensor) and p.is_contiguous() for p in params)
    )


def make_adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """The AdamW for these parameter groups: TritonAdamW where triton_ready, else torch's (fused on CUDA and CPU)."""
    params = [p for group in groups for p in group["params"]]
    if triton_ready(params):
        return TritonAdamW(groups, **kwargs)
    if {p.device.type for p in params} <= {"cuda", "cpu"}:  # fused kernels exist for both
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)
