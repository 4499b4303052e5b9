"""Triton kernels for decode steps (one token per row): the one-row products (`matvec`), attention over
each row's filled cache (`attention`), and what their launches need (`launch`).

`infer.decode.to_decode` routes a model's decode work through them; `torch.compile` takes the
kernels into its graph (and so into the decode step's CUDA graph). Anything they do not take (more
than one row: prefill, other devices, other dtypes, no Triton) goes the reference way (F.linear,
SDPA under a mask), which tests/test_kernels.py (Triton's interpreter, on the CPU) and
tests/test_gpu.py compare them with. What each buys, measured: docs/perf/decode-h100-2026-11.md.
"""

from onebox.infer.kernels.attention import (
    ATTN_CHUNK,
    attention_launch,
    attention_usable,
    decode_attention,
    early_v,
    rope_decode_attention,
)
from onebox.infer.kernels.launch import CHAIN, LAUNCH, available, pdl_available
from onebox.infer.kernels.matvec import BLOCK_K, BLOCK_N, gemv, gemv_warps, linear, usable

__all__ = [
    "ATTN_CHUNK",
    "BLOCK_K",
    "BLOCK_N",
    "CHAIN",
    "LAUNCH",
    "attention_launch",
    "attention_usable",
    "available",
    "decode_attention",
    "early_v",
    "gemv",
    "gemv_warps",
    "linear",
    "pdl_available",
    "rope_decode_attention",
    "usable",
]
