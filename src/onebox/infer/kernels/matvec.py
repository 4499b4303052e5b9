"""The one-row matrix-vector product of a decode step, where every weight matrix is read whole to
multiply it by one row.

A GEMM library tiles for many rows, and a (1 x K) by (K x N) product has too few tiles to keep the card
busy: cuBLAS reads these weights at 0.9-2.3 TB/s of an H100's ~3. Here each program owns 4 output rows
and reads them 512 columns per load with fp32 accumulation: one fixed configuration, chosen by
`benchmarks/gemv_probe.py` (best or within 3% of the best for every decode shape of 600m-A and 3b-A on
an H100). Not autotuned: the autotuner times each candidate on one weight again and again, from L2,
where a decode step reads every weight once from HBM, and it picked configurations slower than cuBLAS.
The reference is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from onebox.infer.kernels.launch import CHAIN, tl, triton

BLOCK_N, BLOCK_K = 4, 512  # rows per program, columns per load

if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        N,
        K,
        stride_w,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
        CHAINED: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        begin = 0
        if PDL:  # launched while the kernel before still runs: load the first weight tile (no kernel writes it), then wait for x
            head = tl.arange(0, BLOCK_K)
            first = tl.load(
                w_ptr + rows[:, None] * stride_w + head[None, :],
                mask=row_mask[:, None] & (head < K)[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            tl.extra.cuda.gdc_wait()
            if CHAINED:  # the next kernel may launch now (it waits for this one's end before it reads)
                tl.extra.cuda.gdc_launch_dependents()
            x = tl.load(x_ptr + head, mask=head < K, other=0.0).to(tl.float32)
            acc += first.to(tl.float32) * x[None, :]
            begin = BLOCK_K
        for start in range(begin, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + rows[:, None] * stride_w + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
                eviction_policy="evict_first",
            ).to(tl.float32)  # read once: keep it out of L2's way
            acc += w * x[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_mask)


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether `gemv` takes this product: one row, on CUDA, half or bf16, contiguous, Triton present."""
    return (
        triton is not None
        and x.is_cuda
        and x.shape[:-1].numel() == 1
        and x.dtype == weight.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dim() == 2
        and weight.is_contiguous()
    )


def gemv_warps(n: int) -> int:
    """Warps per GEMV program for a product of n rows: more where there are few row blocks."""
    return 8 if n <= 1536 else 4


def _launch(x: Tensor, weight: Tensor, pdl: int) -> Tensor:
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
        x,
        weight,
        y,
        n,
        k,
        weight.stride(0),
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        PDL=pdl > 0,
        CHAINED=bool(pdl & CHAIN),
        num_warps=gemv_warps(n),
        **({"launch_pdl": True} if pdl else {}),
    )
    return y


# torch.compile launches user-defined Triton kernels without `launch_pdl`, so the PDL launch is an operator
# of its own, opaque to the compiler, whose launches CUDA-graph capture records with their programmatic edges.
@torch.library.custom_op("onebox::gemv_pdl", mutates_args=(), device_types="cuda")
def _gemv_pdl(x: Tensor, weight: Tensor, pdl: int) -> Tensor:
    return _launch(x, weight, pdl)


@_gemv_pdl.register_fake
def _(x: Tensor, weight: Tensor, pdl: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def gemv(x: Tensor, weight: Tensor, pdl: int = 0) -> Tensor:
    """x (..., K) holding one row, weight (N, K): x @ weight.T as (..., N), accumulated in fp32; `pdl`
    (LAUNCH, CHAIN or'd in): launched with programmatic dependent launch."""
    if pdl:
        return torch.ops.onebox.gemv_pdl(x, weight, int(pdl))
    return _launch(x, weight, 0)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, pdl: int = 0) -> Tensor:
    """F.linear, through `gemv` where it applies (one row on CUDA; a bias is added after it)."""
    if usable(x, weight):
        out = gemv(x, weight, pdl)
        return out if bias is None else out + bias.to(out.dtype)
    return F.linear(x, weight, bias)
