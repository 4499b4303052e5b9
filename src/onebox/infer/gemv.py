"""A Triton matrix-vector product for batch-1 decode steps, where every product reads a whole weight
matrix to multiply it by one row.

Why our own kernel: at batch 1 the H100's cuBLAS kernels read 600m-A's weights at 0.9-2.3 TB/s of the
card's ~3 TB/s (benchmarks/NOTES.md, session 11: q/k/v 2.0, o_proj 0.9, gate/up 2.3, down 1.5): a
GEMM library tiles for many rows, and a (1 x K) by (K x N) product has too few tiles to keep the card
busy. Here each program owns a few output rows and reads its part of the weight once, at full width
(`BLOCK_K` columns per load, many programs in flight), with fp32 accumulation.
One fixed configuration, chosen by `benchmarks/gemv_probe.py` on an H100 (4 rows x 512 columns per load
was best or within 3% of the best for every decode shape of 600m-A and 3b-A, 5-20% faster than cuBLAS
with L2 defeated). Not autotuned: under triton.autotune the decode step's products took 11.9 us each
against cuBLAS's 7.9 at 600m-A, most likely because the autotuner times each candidate on one weight
again and again, i.e. from L2, where the decode step reads every weight once from HBM.
`torch.compile` takes the kernel into its graph (and so into the decode step's CUDA graph).
Rows other than one (prefill, batched decode), other devices and a missing Triton fall back to
`F.linear`, the reference the GPU tests compare it with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK_N, BLOCK_K = 4, 512  # rows per program, columns per load

try:  # Triton comes with PyTorch's CUDA builds; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0,
                        eviction_policy="evict_first").to(tl.float32)  # read once: keep it out of L2's way
            acc += w * x[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_mask)


def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device` (CUDA, with Triton installed)."""
    return triton is not None and device.type == "cuda"


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether `gemv` takes this product: one row, on CUDA, half or bf16, contiguous, Triton present."""
    return (triton is not None and x.is_cuda and x.shape[:-1].numel() == 1 and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2 and weight.is_contiguous())


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., K) holding one row, weight (N, K): x @ weight.T as (..., N), accumulated in fp32."""
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](x, weight, y, n, k, weight.stride(0), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                             num_warps=8 if n <= 1536 else 4)  # more warps where there are few row blocks
    return y


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, through `gemv` where it applies (one row on CUDA)."""
    if bias is None and usable(x, weight):
        return gemv(x, weight)
    return F.linear(x, weight, bias)


class GemvLinear(nn.Linear):
    """nn.Linear whose one-row products go through `gemv`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_triton_gemv(model: nn.Module) -> nn.Module:
    """Route every matrix-vector product of a decode step through `gemv`, in place (same weights): the
    fused q/k/v and gate/up products and the output layer (their `project`), o_proj and down_proj."""
    for module in model.modules():
        if hasattr(module, "project"):
            module.project = linear
        if type(module) is nn.Linear:
            module.__class__ = GemvLinear
    return model
