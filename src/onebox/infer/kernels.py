"""Triton kernels for decode steps (one token per row), where every weight matrix is read whole to
multiply it by one row and attention reads a short stretch of the KV cache.

- `gemv`: the one-row matrix-vector product. A GEMM library tiles for many rows, and a (1 x K) by
  (K x N) product has too few tiles to keep the card busy: cuBLAS reads these weights at 0.9-2.3 TB/s
  of an H100's ~3. Here each program owns 4 output rows and reads them 512 columns per load with fp32
  accumulation: one fixed configuration, chosen by `benchmarks/gemv_probe.py` (best or within 3% of
  the best for every decode shape of 600m-A and 3b-A on an H100). Not autotuned: the autotuner times
  each candidate on one weight again and again, from L2, where a decode step reads every weight once
  from HBM, and it picked configurations slower than cuBLAS.
- `norm_gemv`: the block's RMSNorm folded into the product that follows it (q/k/v, gate/up): each
  program computes the row's norm itself; roundings as RMSNorm's. Measured slower than the norm's own
  kernel plus `gemv`: off by default (the Engine's `kernels`).
- `swiglu_gemv`: SwiGLU's silu(gate) * up computed as the down product loads it; roundings as
  torch's. Measured slower under programmatic dependent launch: off by default.
- `decode_attention`: one query token per row against the cache up to that row's position
  (flash-decoding: the positions split in chunks of 32, each program one (row, head, chunk) with an
  online softmax; the last program of a (row, head) to finish, found by an atomic ticket on a counter
  the KV cache holds, merges the chunks, or without counters a second kernel does), where SDPA reads
  the whole cache under a materialised mask.
- `rope_decode_attention`: the same with RoPE and the cache write folded in: q and this step's k
  rotated in the kernel, this step's k and v written into the cache by the programs that hold their
  position, where inductor runs four small kernels per layer for them.
- Programmatic dependent launch (Hopper and later). LAUNCH: the GEMVs launched while the kernel
  before them finishes, loading their first weight tile before they wait for their input (the Engine
  launches inductor's kernels the same way). CHAIN (default on Hopper): the GEMVs let the next kernel
  launch right after their wait, and the folded-RoPE attention is launched with PDL too
  (`onebox::rope_attention_pdl`), loading its stretch of the cache before its wait. PREFETCH (opt-in,
  measured slower): products of up to PREFETCH_COLUMNS columns load all their weights before the
  wait, and the next kernel launches once their loads are issued.

What each of them buys, measured on an H100: docs/perf/decode-h100-2026-11.md.
`use_decode_kernels(model)` routes a model's decode products through them; `torch.compile` takes the
kernels into its graph (and so into the decode step's CUDA graph). Anything they do not take (more
than one row: prefill, other devices, other dtypes, no Triton) goes the reference way (F.linear,
RMSNorm then F.linear, SDPA under a mask), which the GPU tests compare them with.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK_N, BLOCK_K = 4, 512  # rows per program, columns per load (gemv, norm_gemv)
ATTN_CHUNK = 32  # cache positions per decode-attention program (attention_launch)
# With pdl, products of up to this many columns load all their weights before waiting for their input:
# at 2048 (K's next power of two) a program holds 4 x 2048 bf16 in 48-95 registers; 4096 took 91-168.
PREFETCH_COLUMNS = 2048
# `pdl` flags: any set = launched with PDL (the GEMVs' first weight tile loaded before the wait). PREFETCH: all weights up to
# PREFETCH_COLUMNS loaded before it, the next kernel let launch once the loads are issued (the GEMVs, the attention's merge).
# CHAIN: the GEMVs let the next kernel launch right after their wait, and the folded-RoPE attention is launched with PDL
# too, loading its stretch of the cache before its wait (then letting the next kernel launch).
LAUNCH, PREFETCH, CHAIN = 1, 2, 4
AFTER_LOADS, AFTER_WAIT = (
    1,
    2,
)  # where a kernel calls gdc_launch_dependents (TRIGGER; 0: never, the next launches at its end)
PLAIN, NORM, SWIGLU = 0, 1, 2  # the GEMV kernel's ROW: x itself, RMSNorm(x) with scale g, silu(x[:K]) * x[K:]

try:  # Triton comes with PyTorch's CUDA builds; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _row_tile(x_ptr, g_ptr, cols, col_mask, K, rstd, ROW: tl.constexpr):
        """Columns `cols` of the row the product multiplies, in fp32: x, RMSNorm(x) or silu(gate) * up (ROW)."""
        dtype = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if ROW == 1:  # NORM: roundings as RMSNorm's: normed in the row's dtype, then scaled
            g = tl.load(g_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            x = ((x * rstd).to(dtype).to(tl.float32) * g).to(dtype).to(tl.float32)
        if ROW == 2:  # SWIGLU: x is the gate; F.silu(gate) * up, rounded as torch rounds them
            up = tl.load(x_ptr + K + cols, mask=col_mask, other=0.0).to(tl.float32)
            x = ((x / (1.0 + tl.exp(-x))).to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)
        return x

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        g_ptr,
        w_ptr,
        y_ptr,
        N,
        K,
        stride_w,
        eps,
        ROW: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
        WHOLE: tl.constexpr,
        TRIGGER: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        if PDL:  # launched while the kernel before still runs: load weights (no kernel writes them), then wait for x
            if WHOLE > 0:  # all of this program's rows at once (WHOLE: K's next power of two)
                spread = tl.arange(0, WHOLE)
                slab = tl.load(
                    w_ptr + rows[:, None] * stride_w + spread[None, :],
                    mask=row_mask[:, None] & (spread < K)[None, :],
                    other=0.0,
                    eviction_policy="evict_first",
                )
            else:  # the first tile
                head = tl.arange(0, BLOCK_K)
                first = tl.load(
                    w_ptr + rows[:, None] * stride_w + head[None, :],
                    mask=row_mask[:, None] & (head < K)[None, :],
                    other=0.0,
                    eviction_policy="evict_first",
                )
            tl.extra.cuda.gdc_wait()
            if TRIGGER == 2:  # AFTER_WAIT: the next kernel may launch now (it waits for this one's end before it reads)
                tl.extra.cuda.gdc_launch_dependents()
        rstd = 0.0
        if (
            ROW == 1
        ):  # NORM: RMSNorm's reciprocal root mean square, computed by every program (the row is a few KB, from L2)
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
                squares += x * x
            rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        if WHOLE > 0:  # (only with PDL)
            spread = tl.arange(0, WHOLE)
            x = _row_tile(x_ptr, g_ptr, spread, spread < K, K, rstd, ROW)
            if TRIGGER == 1:  # AFTER_LOADS: every load issued: the next kernel may launch (it waits for this one's end)
                tl.extra.cuda.gdc_launch_dependents()
            total = tl.sum(slab.to(tl.float32) * x[None, :], axis=1)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            begin = 0
            if PDL:
                head = tl.arange(0, BLOCK_K)
                acc += first.to(tl.float32) * _row_tile(x_ptr, g_ptr, head, head < K, K, rstd, ROW)[None, :]
                begin = BLOCK_K
            for start in range(begin, K, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                col_mask = cols < K
                x = _row_tile(x_ptr, g_ptr, cols, col_mask, K, rstd, ROW)
                w = tl.load(
                    w_ptr + rows[:, None] * stride_w + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0,
                    eviction_policy="evict_first",
                ).to(tl.float32)  # read once: keep it out of L2's way
                acc += w * x[None, :]
            if TRIGGER == 1:
                tl.extra.cuda.gdc_launch_dependents()
            total = tl.sum(acc, axis=1)
        tl.store(y_ptr + rows, total.to(y_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _rope_row(ptr, dims, partner, sign, cos, sin):
        """One head's row rotated by its position's angles, rounded as `onebox.model.apply_rope` rounds in
        the row's dtype (each product, then the sum): x * cos + rotate_half(x) * sin."""
        dtype = ptr.dtype.element_ty
        x = tl.load(ptr + dims).to(tl.float32)
        other = tl.load(ptr + partner).to(tl.float32) * sign
        return ((x * cos).to(dtype).to(tl.float32) + (other * sin).to(dtype).to(tl.float32)).to(dtype)

    @triton.jit
    def _attention_chunk_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        spos_b,
        part_ptr,
        stat_ptr,
        HEADS,
        GROUP,
        CHUNKS,
        scale,
        sq_b,
        sq_h,
        sk_b,
        sk_h,
        sk_s,
        sv_b,
        sv_h,
        sv_s,
        kn_ptr,
        vn_ptr,
        cos_ptr,
        sin_ptr,
        skn_b,
        skn_h,
        svn_b,
        svn_h,
        scos_b,
        count_ptr,
        o_ptr,
        so_b,
        so_h,
        D: tl.constexpr,
        CHUNK: tl.constexpr,
        ROPE: tl.constexpr,
        EARLY_V: tl.constexpr,
        MERGE: tl.constexpr,
        MERGE_BLOCK: tl.constexpr,
        TRIGGER: tl.constexpr,
        PDL: tl.constexpr,
    ):
        row_head = tl.program_id(0)  # row * HEADS + head
        chunk = tl.program_id(1)
        row, head = row_head // HEADS, row_head % HEADS
        kv_head = head // GROUP
        # With PDL everything up to `gdc_wait` runs while the kernel before still does: it reads only what no kernel of
        # this step writes before it (the cache's earlier positions; input_pos, which must come from outside the step)
        length = tl.load(pos_ptr + row * spos_b).to(tl.int32) + 1
        out = row_head * CHUNKS + chunk
        dims = tl.arange(0, D)
        start = chunk * CHUNK
        positions = start + tl.arange(0, CHUNK)
        valid = positions < length  # none past this row's position: those programs load nothing
        last = length - 1  # this step's position: with ROPE its slot is not read from the cache (this step's k, v are)
        cached = valid
        if ROPE:
            cached = valid & (positions != last)
        k = tl.load(
            k_ptr + row * sk_b + kv_head * sk_h + positions[:, None] * sk_s + dims[None, :],
            mask=cached[:, None],
            other=0.0,
        ).to(tl.float32)
        if EARLY_V:  # small tiles: V's load in flight with K's (one memory round trip instead of two)
            v = tl.load(
                v_ptr + row * sv_b + kv_head * sv_h + positions[:, None] * sv_s + dims[None, :],
                mask=cached[:, None],
                other=0.0,
            ).to(tl.float32)
        if PDL:  # q (and this step's k, v) come from the kernel before; every store below lands after it has ended
            tl.extra.cuda.gdc_wait()
            if TRIGGER == 2:
                tl.extra.cuda.gdc_launch_dependents()
        if start < length:
            if (
                ROPE
            ):  # q, and this step's k, still unrotated: rotate them here; this step's k and v go into the cache here
                dtype = q_ptr.dtype.element_ty
                partner = (dims + D // 2) % D
                sign = tl.where(dims < D // 2, -1.0, 1.0)
                cos = tl.load(cos_ptr + row * scos_b + dims).to(dtype).to(tl.float32)
                sin = tl.load(sin_ptr + row * scos_b + dims).to(dtype).to(tl.float32)
                q = _rope_row(q_ptr + row * sq_b + head * sq_h, dims, partner, sign, cos, sin).to(tl.float32) * scale
                if last < start + CHUNK:  # the chunk that holds this step's position: k from this step, rotated
                    k_new = _rope_row(kn_ptr + row * skn_b + kv_head * skn_h, dims, partner, sign, cos, sin)
                    k = tl.where((positions == last)[:, None], k_new.to(tl.float32)[None, :], k)
                    if (
                        head % GROUP == 0
                    ):  # one program per key/value head writes this step's k (and v, below) into the cache
                        tl.store(
                            k_ptr + row * sk_b + kv_head * sk_h + last * sk_s + dims, k_new.to(k_ptr.dtype.element_ty)
                        )
            else:
                q = tl.load(q_ptr + row * sq_b + head * sq_h + dims).to(tl.float32) * scale
            scores = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
            top = tl.max(scores, axis=0)
            weights = tl.exp(scores - top)
            if (
                not EARLY_V
            ):  # large tiles: V after K's scores (both at once would double the registers: 195 at chunk 64, 4 warps)
                v = tl.load(
                    v_ptr + row * sv_b + kv_head * sv_h + positions[:, None] * sv_s + dims[None, :],
                    mask=cached[:, None],
                    other=0.0,
                ).to(tl.float32)
            if ROPE:
                if last < start + CHUNK:
                    v_new = tl.load(vn_ptr + row * svn_b + kv_head * svn_h + dims)
                    v = tl.where((positions == last)[:, None], v_new.to(tl.float32)[None, :], v)
                    if head % GROUP == 0:  # (no program reads the cache at this position: see `cached`)
                        tl.store(
                            v_ptr + row * sv_b + kv_head * sv_h + last * sv_s + dims, v_new.to(v_ptr.dtype.element_ty)
                        )
            tl.store(part_ptr + out * D + dims, tl.sum(weights[:, None] * v, axis=0))
            tl.store(stat_ptr + out * 2, top)
            tl.store(stat_ptr + out * 2 + 1, tl.sum(weights, axis=0))
        else:  # past this row's position: weighs nothing in the merge
            tl.store(stat_ptr + out * 2, float("-inf"))
            tl.store(stat_ptr + out * 2 + 1, 0.0)
        if MERGE:  # the last of this (row, head)'s programs to finish merges them all: no second kernel
            tl.debug_barrier()  # every thread's stores above come before the ticket (released with it)
            ticket = tl.atomic_add(count_ptr + row_head, 1, sem="acq_rel")
            if ticket == CHUNKS - 1:
                tl.store(count_ptr + row_head, 0)  # every program has taken its ticket: zero for the next step
                _merge_row(part_ptr, stat_ptr, o_ptr, row_head, HEADS, CHUNKS, so_b, so_h, D, MERGE_BLOCK, TRIGGER)

    @triton.jit
    def _merge_row(
        part_ptr,
        stat_ptr,
        o_ptr,
        row_head,
        HEADS,
        CHUNKS,
        so_b,
        so_h,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        TRIGGER: tl.constexpr,
    ):
        """One (row, head)'s chunk results merged (their softmax rescaled to one maximum), BLOCK chunks at a time;
        read from L2 (.cg): other programs wrote them during this kernel."""
        row, head = row_head // HEADS, row_head % HEADS
        dims = tl.arange(0, D)
        top = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)
        total = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
        acc = tl.zeros((D,), tl.float32)
        for first in range(0, CHUNKS, BLOCK):
            chunks = first + tl.arange(0, BLOCK)
            live = chunks < CHUNKS
            tops = tl.load(
                stat_ptr + (row_head * CHUNKS + chunks) * 2, mask=live, other=float("-inf"), cache_modifier=".cg"
            )
            sums = tl.load(stat_ptr + (row_head * CHUNKS + chunks) * 2 + 1, mask=live, other=0.0, cache_modifier=".cg")
            filled = tops > float("-inf")
            parts = tl.load(
                part_ptr + (row_head * CHUNKS + chunks)[:, None] * D + dims[None, :],
                mask=filled[:, None],
                other=0.0,
                cache_modifier=".cg",
            )
            new_top = tl.maximum(
                top, tl.max(tops, axis=0)
            )  # the first block holds chunk 0, which holds position 0: finite from here
            scale = tl.where(filled, tl.exp(tops - new_top), 0.0)
            carry = tl.exp(top - new_top)  # 0 on the first block
            acc = acc * carry + tl.sum(parts * scale[:, None], axis=0)
            total = total * carry + tl.sum(sums * scale, axis=0)
            top = new_top
        if TRIGGER == 1:  # the product after attention (o_proj) may launch and load its weights while this kernel ends
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(o_ptr + row * so_b + head * so_h + dims, (acc / total).to(o_ptr.dtype.element_ty))

    @triton.jit
    def _attention_merge_kernel(
        part_ptr,
        stat_ptr,
        o_ptr,
        HEADS,
        CHUNKS,
        so_b,
        so_h,
        D: tl.constexpr,
        MERGE_BLOCK: tl.constexpr,
        TRIGGER: tl.constexpr,
    ):
        _merge_row(part_ptr, stat_ptr, o_ptr, tl.program_id(0), HEADS, CHUNKS, so_b, so_h, D, MERGE_BLOCK, TRIGGER)


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device` (CUDA, with Triton installed)."""
    return triton is not None and device.type == "cuda"


def pdl_available(device: torch.device) -> bool:
    """Whether the GEMVs can be launched with programmatic dependent launch on `device` (Hopper, sm_90, and
    later, with a Triton that has grid dependency control: 3.3 onwards)."""
    return (
        available(device)
        and torch.cuda.get_device_capability(device)[0] >= 9
        and hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")
    )


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


def _product(
    row: Tensor, weight: Tensor, kind: int, scale: Tensor | None = None, eps: float = 0.0, pdl: int = 0
) -> Tensor:
    """One launch of the GEMV kernel: `row` (..., K or 2K) as `kind` says (PLAIN, NORM, SWIGLU), weight (N, K);
    `pdl` (LAUNCH or PREFETCH): through the `onebox::gemv_pdl` operator (programmatic dependent launch)."""
    if pdl:
        return torch.ops.onebox.gemv_pdl(row, weight, kind, scale, eps, int(pdl))
    return _launch(row, weight, kind, scale, eps, 0)


def _launch(row: Tensor, weight: Tensor, kind: int, scale: Tensor | None, eps: float, pdl: int) -> Tensor:
    n, k = weight.shape
    row = row.contiguous()
    y = torch.empty((*row.shape[:-1], n), dtype=row.dtype, device=row.device)
    options = {"launch_pdl": True} if pdl else {}
    whole = triton.next_power_of_2(k) if pdl & PREFETCH and k <= PREFETCH_COLUMNS else 0
    trigger = AFTER_WAIT if pdl & CHAIN else AFTER_LOADS if pdl & PREFETCH else 0
    _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
        row,
        row if scale is None else scale,
        weight,
        y,
        n,
        k,
        weight.stride(0),
        eps,
        ROW=kind,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        PDL=pdl > 0,
        WHOLE=whole,
        TRIGGER=trigger,
        num_warps=gemv_warps(n),
        **options,
    )
    return y


def gemv_warps(n: int) -> int:
    """Warps per GEMV program for a product of n rows: more where there are few row blocks."""
    return 8 if n <= 1536 else 4


# Programmatic dependent launch (Hopper and later): the kernel may start while the one before it finishes,
# loading its first weight tile before it waits for its input (`gdc_wait`). torch.compile launches
# user-defined Triton kernels without `launch_pdl`, so this path is an operator of its own, opaque to
# the compiler, whose launches CUDA-graph capture records with their programmatic edges.
@torch.library.custom_op("onebox::gemv_pdl", mutates_args=(), device_types="cuda")
def _gemv_pdl(row: Tensor, weight: Tensor, kind: int, scale: Tensor | None, eps: float, pdl: int) -> Tensor:
    return _launch(row, weight, kind, scale, eps, pdl)


@_gemv_pdl.register_fake
def _(row: Tensor, weight: Tensor, kind: int, scale: Tensor | None, eps: float, pdl: int) -> Tensor:
    return row.new_empty((*row.shape[:-1], weight.shape[0]))


def gemv(x: Tensor, weight: Tensor, pdl: int = 0) -> Tensor:
    """x (..., K) holding one row, weight (N, K): x @ weight.T as (..., N), accumulated in fp32."""
    return _product(x, weight, PLAIN, pdl=pdl)


def norm_gemv(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, pdl: int = 0) -> Tensor:
    """RMSNorm(x) (scale `norm_weight`) @ weight.T for one row x (..., K), in one kernel."""
    return _product(x, weight, NORM, norm_weight, eps, pdl=pdl)


def swiglu_gemv(gate_up: Tensor, weight: Tensor, pdl: int = 0) -> Tensor:
    """(silu(gate) * up) @ weight.T for one row gate_up (..., 2K) = [gate | up], weight (N, K), in one kernel."""
    return _product(gate_up, weight, SWIGLU, pdl=pdl)


def swiglu_down(gate_up: Tensor, down: nn.Linear, pdl: int = 0) -> Tensor:
    """down(silu(gate) * up) of a SwiGLU block's fused gate|up output, through `swiglu_gemv` where it applies."""
    if down.bias is None and usable(gate_up, down.weight) and gate_up.shape[-1] == 2 * down.weight.shape[1]:
        return swiglu_gemv(gate_up, down.weight, pdl)
    gate, up = gate_up.chunk(2, dim=-1)
    return down(F.silu(gate) * up)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, pdl: int = 0) -> Tensor:
    """F.linear, through `gemv` where it applies (one row on CUDA)."""
    if bias is None and usable(x, weight):
        return gemv(x, weight, pdl)
    return F.linear(x, weight, bias)


def normed_linear(x: Tensor, weight: Tensor, norm: nn.Module, pdl: int = 0) -> Tensor:
    """F.linear(norm(x), weight) for an RMSNorm `norm`, through `norm_gemv` where it applies."""
    if usable(x, weight) and norm.weight.dtype == x.dtype:
        return norm_gemv(x, norm.weight, norm.eps, weight, pdl)
    return F.linear(norm(x), weight)


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    input_pos: Tensor,
    chunk: int | None = None,
    warps: int | None = None,
    pdl: int = 0,
    counts: Tensor | None = None,
) -> Tensor:
    """Attention of one query token per row, q (B, H, 1, D), over the cache k, v (B, KV, S, D) up to each
    row's position (input_pos: (B, 1) per row, or (1,) for all): what SDPA computes under the causal mask
    (the reference, `onebox.model.cached_attention`), for the rows' filled positions only. `chunk`
    (positions per program, a power of two) and `warps` are what benchmarks/gemv_probe.py sweeps (None:
    `attention_launch`'s); `pdl`: the kernel after it (a product launched with programmatic dependent launch)
    may start before it ends. `counts`: int32 zeros, one per (row, head) (`KVCache.counts`), for the chunks to
    merge themselves (the last to finish merges; left at zero); None: a second kernel merges them."""
    return _attention(q, k, v, input_pos, None, chunk, warps, pdl, counts)


def rope_decode_attention(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    input_pos: Tensor,
    chunk: int | None = None,
    warps: int | None = None,
    pdl: int = 0,
    counts: Tensor | None = None,
) -> Tensor:
    """`decode_attention` with the two steps before it folded in: q and this step's k (B, H or KV, 1, D) still
    unrotated, rotated by cos, sin (B, 1, D) or (1, D), fp32 (`onebox.model.apply_rope`), and this step's k
    and v written into the cache at each row's position (`KVCache.update`), in the same kernel: the
    reference is `onebox.model.rope_cached_attention`."""
    dim = q.shape[-1]
    cos, sin = cos.reshape(-1, dim), sin.reshape(-1, dim)
    fresh = (k_new, v_new, cos.contiguous(), sin.contiguous())
    return _attention(q, cache_k, cache_v, input_pos, fresh, chunk, warps, pdl, counts)


def attention_launch(rows: int, rope: bool = False) -> tuple[int, int]:
    """Positions per program and warps for the decode attention kernel: chunks of 32; 2 warps with RoPE
    folded in, else 4 for one row and 2 for more: the fastest of the chunk x warps sweep of
    `gemv_probe.py --attention` on an H100 (600m-A at position 255: with RoPE 8.0 us per layer at 32 x 2
    against 8.5 at 32 x 4 and 9.9 at 64 x 8; without, 8.1 at 32 x 4 against 11.7 at 64 x 4)."""
    return ATTN_CHUNK, 2 if rope or rows > 1 else 4


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    input_pos: Tensor,
    fresh: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    chunk: int | None,
    warps: int | None,
    pdl: int,
    counts: Tensor | None,
) -> Tensor:
    batch, heads = q.shape[:2]
    launch = attention_launch(batch, fresh is not None)
    chunk, warps = chunk or launch[0], warps or launch[1]
    if counts is not None and (
        counts.numel() != batch * heads or counts.dtype != torch.int32 or not counts.is_contiguous()
    ):
        raise ValueError(
            f"counts must be int32, contiguous, one per (row, head): {batch} x {heads}, got {tuple(counts.shape)} {counts.dtype}"
        )
    if (
        pdl & CHAIN and fresh is not None and counts is not None
    ):  # one kernel, launched with PDL through its own operator
        return torch.ops.onebox.rope_attention_pdl(q, *fresh, k, v, input_pos, counts, chunk, warps, pdl)
    return _attention_launch(q, k, v, input_pos, fresh, chunk, warps, pdl, counts, chained=False)


def _attention_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    input_pos: Tensor,
    fresh: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    chunk: int,
    warps: int,
    pdl: int,
    counts: Tensor | None,
    chained: bool,
) -> Tensor:
    batch, heads, _, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    pos = input_pos.reshape(-1, input_pos.shape[-1])[
        :, -1
    ]  # each row's position (B,), or one for all (1,): read by the kernel
    chunks = triton.cdiv(slots, chunk)
    parts = torch.empty(batch * heads * chunks, dim, dtype=torch.float32, device=q.device)
    stats = torch.empty(batch * heads * chunks, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, 1, heads, dim, dtype=q.dtype, device=q.device)  # the layout o_proj reads: no copy after
    if fresh is None:
        k_new = v_new = cos = sin = q  # not read
        fresh_strides = (0, 0, 0, 0, 0)
    else:
        k_new, v_new, cos, sin = fresh
        fresh_strides = (
            k_new.stride(0),
            k_new.stride(1),
            v_new.stride(0),
            v_new.stride(1),
            dim if cos.shape[0] > 1 else 0,
        )
    merge = counts is not None
    trigger = AFTER_WAIT if chained else AFTER_LOADS if pdl & PREFETCH else 0
    block = min(16, triton.next_power_of_2(chunks))
    _attention_chunk_kernel[(batch * heads, chunks)](
        q,
        k,
        v,
        pos,
        pos.stride(0) if pos.numel() > 1 else 0,
        parts,
        stats,
        heads,
        heads // kv_heads,
        chunks,
        1.0 / math.sqrt(dim),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        k_new,
        v_new,
        cos,
        sin,
        *fresh_strides,
        counts if merge else stats,
        out,
        out.stride(0),
        out.stride(2),
        D=dim,
        CHUNK=chunk,
        ROPE=fresh is not None,
        EARLY_V=early_v(chunk, dim),
        MERGE=merge,
        MERGE_BLOCK=block,
        TRIGGER=trigger,
        PDL=chained,
        num_warps=warps,
        **({"launch_pdl": True} if chained else {}),
    )
    if not merge:
        _attention_merge_kernel[(batch * heads,)](
            parts,
            stats,
            out,
            heads,
            chunks,
            out.stride(0),
            out.stride(2),
            D=dim,
            MERGE_BLOCK=block,
            TRIGGER=trigger,
            num_warps=4,
        )
    return out.transpose(1, 2)


# The folded-RoPE attention launched with programmatic dependent launch (CHAIN): as `onebox::gemv_pdl`, an operator of its
# own, since torch.compile launches user-defined Triton kernels without `launch_pdl`. It writes this step's k and v into
# the cache and takes tickets on the counters. It reads input_pos and the cache before it waits for the kernel before
# it, so neither may be written by that kernel: input_pos comes from outside the compiled step (the Engine's positions
# buffer) and the cache is the Engine's own static buffers, which inductor mutates in place (no copy kernel before the
# operator: the probe's kernel count per step is the same with and without `chain`, 175 at 600m-A).
@torch.library.custom_op(
    "onebox::rope_attention_pdl", mutates_args=("cache_k", "cache_v", "counts"), device_types="cuda"
)
def _rope_attention_pdl(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    input_pos: Tensor,
    counts: Tensor,
    chunk: int,
    warps: int,
    pdl: int,
) -> Tensor:
    return _attention_launch(
        q, cache_k, cache_v, input_pos, (k_new, v_new, cos, sin), chunk, warps, pdl, counts, chained=True
    )


@_rope_attention_pdl.register_fake
def _(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    input_pos: Tensor,
    counts: Tensor,
    chunk: int,
    warps: int,
    pdl: int,
) -> Tensor:
    batch, heads, _, dim = q.shape
    return q.new_empty(batch, 1, heads, dim).transpose(1, 2)


def early_v(chunk: int, dim: int) -> bool:
    """Whether the attention kernel loads V together with K: for tiles of up to 4096 values (chunk 32 at head size 128)."""
    return chunk * dim <= 4096


def attention_usable(q: Tensor, k: Tensor) -> bool:
    """Whether `decode_attention` takes this step: one token, on CUDA, half or bf16, a power-of-two head size."""
    dim = q.shape[-1]
    return (
        triton is not None
        and q.is_cuda
        and q.shape[2] == 1
        and q.dtype == k.dtype
        and q.dtype in (torch.bfloat16, torch.float16)
        and dim >= 16
        and dim & (dim - 1) == 0
        and q.stride(-1) == 1
        and k.stride(-1) == 1
    )


def attend(
    q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, reference: Callable[..., Tensor], pdl: int = 0
) -> Tensor:
    """decode_attention where it applies, else `reference` (same arguments)."""
    if attention_usable(q, k):
        return decode_attention(q, k, v, input_pos, pdl=pdl)
    return reference(q, k, v, input_pos)


def rope_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache: nn.Module,
    input_pos: Tensor,
    attend: Callable[..., Tensor],
    reference: Callable[..., Tensor],
    pdl: int = 0,
) -> Tensor:
    """rope_decode_attention where it applies (one token into a whole KVCache of q's dtype, no window), else
    `reference` (same arguments: `onebox.model.rope_cached_attention`)."""
    if (
        getattr(cache, "window", 0) is None
        and cache.k.dtype == q.dtype
        and attention_usable(q, cache.k)
        and k.stride(-1) == 1
        and v.stride(-1) == 1
        and cache.k.is_contiguous()
        and cache.v.is_contiguous()
    ):
        counts = getattr(
            cache, "counts", None
        )  # the chunks merge themselves where the cache holds one counter per (row, head)
        counts = (
            counts
            if counts is not None and counts.numel() == q.shape[0] * q.shape[1] and counts.is_contiguous()
            else None
        )
        return rope_decode_attention(q, k, v, cos, sin, cache.k, cache.v, input_pos, pdl=pdl, counts=counts)
    return reference(q, k, v, cos, sin, cache, input_pos, attend)


class GemvLinear(nn.Linear):
    """nn.Linear whose one-row products go through `gemv` (`pdl`: with programmatic dependent launch)."""

    pdl = 0

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.pdl)


class DeferredRMSNorm(nn.Module):
    """Stands in a block for an RMSNorm whose work the next product does (`normed_linear`): passes x
    through, holding the norm's own weight (so the state dict keeps its keys)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.weight, self.eps = inner.weight, inner.eps

    def forward(self, x: Tensor) -> Tensor:
        return x


def _folded(project: Callable[..., Tensor]) -> bool:
    return isinstance(project, functools.partial) and project.func is normed_linear


def use_decode_kernels(
    model: nn.Module,
    gemv: bool = True,
    norm: bool = True,
    attention: bool = True,
    swiglu: bool = True,
    pdl: int = 0,
    rope: bool = False,
) -> nn.Module:
    """Route a Transformer's decode work through the kernels above, in place (same weights, same state
    dict; idempotent): the one-row products (fused q/k/v and gate/up,
    o_proj, down, the output layer; `gemv`), each block's two norms into the products after them (`norm`;
    needs the fused q/k/v and gate/up weights, `onebox.model.fuse_projections`), attention over the
    cache (`attention`), and SwiGLU's activation and product folded into the down product (`swiglu`;
    fused gate/up weights too). `pdl` (LAUNCH, with PREFETCH and CHAIN or'd in; 0 off): the products launched
    with programmatic dependent launch (Hopper and later; each starts loading its weights while the kernel
    before it finishes; PREFETCH: all of them, and the next kernel launches early; CHAIN: the next kernel
    launches right after their wait, and the folded-RoPE attention is launched with PDL too). `rope`: RoPE and the
    cache write folded into the attention kernel (`rope_decode_attention`)."""
    for module in model.modules():
        if gemv and hasattr(module, "project") and not _folded(module.project):  # not a norm folded in already
            module.project = functools.partial(linear, pdl=pdl) if pdl else linear
        if gemv and type(module) in (nn.Linear, GemvLinear):
            module.__class__ = GemvLinear
            module.pdl = pdl
        if attention and hasattr(module, "attend") and not isinstance(module.attend, functools.partial):
            module.attend = functools.partial(attend, reference=module.attend, pdl=pdl)
        if rope and hasattr(module, "cached") and not isinstance(module.cached, functools.partial):
            module.cached = functools.partial(rope_attend, reference=module.cached, pdl=pdl)
        if (
            swiglu
            and getattr(module, "gate_up_weight", None) is not None
            and getattr(module, "activation", None) == "swiglu"
        ):
            module.gated_down = functools.partial(swiglu_down, pdl=pdl) if pdl else swiglu_down
    if norm:
        for block in getattr(model, "layers", []):
            pairs = (
                (block, "input_layernorm", block.self_attn, "qkv_weight"),
                (block, "post_attention_layernorm", block.mlp, "gate_up_weight"),
            )
            for owner, name, user, fused in pairs:
                inner = getattr(owner, name)
                if getattr(user, fused) is None or isinstance(inner, DeferredRMSNorm):
                    continue
                setattr(owner, name, DeferredRMSNorm(inner))
                user.project = functools.partial(normed_linear, norm=inner, pdl=pdl)
    return model
