"""A mixture of experts' products for a decode step: each (token, expert) pair's one-row product with
that expert's weights, read in place from the stacked expert tensors by the pair's expert index.

The gathered reference (`moe.MoE.gathered`) copies each pair's expert weights out of the stack and then
multiplies them batched: three passes over the bytes a decode step must read once. Here one program owns
BLOCK_N output rows of one pair and reads its expert's rows straight from the stack with fp32
accumulation, as the one-row GEMV (`matvec`) does. With `swiglu` the first product (gate and up stacked,
2H rows) gives silu(gate) * up (H values a pair) in the same program, so the hidden never goes to memory
twice. The index may address an expert cache's slots as well as a model's experts (any (S, N, K) stack).
Static shapes: it compiles into the decode step's CUDA graph. The reference is `reference` (fp32 products
of the gathered weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from onebox.infer.kernels.launch import tl, triton

BLOCK_N = 4

if triton is not None:

    @triton.jit
    def _expert_kernel(
        x_ptr,
        w_ptr,
        index_ptr,
        y_ptr,
        N,
        K,
        stride_x,
        stride_e,
        stride_n,
        PER_ROW: tl.constexpr,
        SWIGLU: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pair = tl.program_id(1)
        expert = tl.load(index_ptr + pair).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        w_base = w_ptr + expert * stride_e
        x_base = x_ptr + (pair // PER_ROW).to(tl.int64) * stride_x
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if SWIGLU:
            acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_base + cols, mask=col_mask, other=0.0).to(tl.float32)
            offsets = rows[:, None] * stride_n + cols[None, :]
            w = tl.load(w_base + offsets, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            acc += w * x[None, :]
            if SWIGLU:  # the up rows sit N rows below the gate rows
                u = tl.load(w_base + N * stride_n + offsets, mask=mask, other=0.0, eviction_policy="evict_first")
                acc_up += u.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
        if SWIGLU:  # silu(gate) * up, with silu(g) = g * sigmoid(g) as torch computes it (in fp32 here)
            gate = out.to(y_ptr.dtype.element_ty).to(tl.float32)
            up = tl.sum(acc_up, axis=1).to(y_ptr.dtype.element_ty).to(tl.float32)
            out = gate * tl.sigmoid(gate) * up
        tl.store(y_ptr + pair.to(tl.int64) * N + rows, out.to(y_ptr.dtype.element_ty), mask=row_mask)


def usable(x: Tensor, weights: Tensor) -> bool:
    """Whether `expert_products` takes this step: CUDA (or Triton's interpreter), half or bf16, contiguous."""
    return (
        triton is not None
        and x.dtype == weights.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
        and weights.dim() == 3
        and weights.is_contiguous()
        and (x.is_cuda or x.device.type == "cpu" and _interpreting())
    )


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def expert_products(x: Tensor, weights: Tensor, index: Tensor, per_row: int = 1, swiglu: bool = False) -> Tensor:
    """Pair p's product x[p // per_row] @ weights[index[p]].T for every pair: x (R, K) rows, weights (E, N, K)
    stacked, index (P,) int; (P, N) out, or with `swiglu` (N = 2H: gate rows, then up rows) silu(gate) * up
    as (P, H). An operator of its own, opaque to torch.compile (which records its launch in the CUDA graph)."""
    return torch.ops.onebox.expert_products(x, weights, index, per_row, swiglu)


@torch.library.custom_op("onebox::expert_products", mutates_args=(), device_types=("cuda", "cpu"))
def _expert_products(x: Tensor, weights: Tensor, index: Tensor, per_row: int, swiglu: bool) -> Tensor:
    experts, n, k = weights.shape
    out_rows = n // 2 if swiglu else n
    x = x.contiguous()
    index = index.reshape(-1).contiguous()
    y = torch.empty((index.numel(), out_rows), dtype=x.dtype, device=x.device)
    block_k = 512 if k % 512 == 0 or k > 2048 else 256
    _expert_kernel[(triton.cdiv(out_rows, BLOCK_N), index.numel())](
        x,
        weights,
        index,
        y,
        out_rows,
        k,
        x.stride(0),
        weights.stride(0),
        weights.stride(1),
        PER_ROW=per_row,
        SWIGLU=swiglu,
        BLOCK_N=BLOCK_N,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return y


@_expert_products.register_fake
def _(x: Tensor, weights: Tensor, index: Tensor, per_row: int, swiglu: bool) -> Tensor:
    n = weights.shape[1] // 2 if swiglu else weights.shape[1]
    return x.new_empty((index.numel(), n))


def reference(x: Tensor, weights: Tensor, index: Tensor, per_row: int = 1, swiglu: bool = False) -> Tensor:
    """What `expert_products` computes, through gathered weights and fp32 products (rounded as it rounds)."""
    rows = x.repeat_interleave(per_row, dim=0).float()
    y = torch.bmm(weights[index.reshape(-1)].float(), rows[:, :, None]).squeeze(-1)
    if not swiglu:
        return y.to(x.dtype)
    gate, up = (part.to(x.dtype).float() for part in y.chunk(2, dim=-1))
    return (F.silu(gate) * up).to(x.dtype)


def moe_decode(x: Tensor, gate_up: Tensor, down: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
    """A decode step's experts: x (N, dim) rows, chosen/weights (N, k) from the router; (N, dim) out, the
    pairs' outputs mixed by the router's weights."""
    n, k = chosen.shape
    hidden = expert_products(x, gate_up, chosen, per_row=k, swiglu=True)
    y = expert_products(hidden, down, chosen)
    return (y.view(n, k, -1) * weights[:, :, None]).sum(dim=1)
