"""Decode attention: one query token per row against the KV cache up to that row's position.

- `decode_attention` (flash-decoding): the positions split in chunks of 32, each program one (row,
  head, chunk) with an online softmax; the last program of a (row, head) to finish, found by an atomic
  ticket on a counter the decode cache holds (`infer.decode.DecodeKVCache.counts`), merges the chunks,
  or without counters a second kernel does. SDPA instead reads the whole cache under a materialised
  mask. The reference is `onebox.model.cached_attention`.
- `rope_decode_attention`: the same with RoPE and the cache write folded in: q and this step's k
  rotated in the kernel, this step's k and v written into the cache by the programs that hold their
  position, where inductor runs four small kernels per layer for them. The reference is
  `onebox.model.rope_cached_attention`.

With CHAIN (`launch.py`) the folded-RoPE attention is launched with programmatic dependent launch
(`onebox::rope_attention_pdl`), loading its stretch of the cache before its wait.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from onebox.infer.kernels.launch import CHAIN, triton

ATTN_CHUNK = 32  # cache positions per decode-attention program (attention_launch)

if triton is not None:
    from onebox.infer.kernels.flash_decode import _attention_chunk_kernel, _attention_merge_kernel


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
    may start before it ends. `counts`: int32 zeros, one per (row, head) (`DecodeKVCache.counts`), for the chunks to
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
