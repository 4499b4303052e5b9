"""What the decode kernels need to launch: Triton, a CUDA device, and (for programmatic dependent
launch) Hopper or later.

Programmatic dependent launch (PDL) lets a kernel start while the one before it finishes. `pdl` flags:
LAUNCH: the kernel is launched with PDL and does what it may before its `gdc_wait` (the GEMVs load
their first weight tile; the folded-RoPE attention loads its stretch of the cache). CHAIN (with
LAUNCH): right after its wait the kernel lets the next one launch (`gdc_launch_dependents`), so a
chain of decode kernels overlaps each launch with the one before. What each buys, measured on an
H100: docs/perf/decode-h100-2026-11.md.
"""

from __future__ import annotations

import torch

try:  # Triton comes with PyTorch's CUDA builds; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

LAUNCH, CHAIN = 1, 2


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device` (CUDA, with Triton installed)."""
    return triton is not None and device.type == "cuda"


def pdl_available(device: torch.device) -> bool:
    """Whether kernels can be launched with programmatic dependent launch on `device` (Hopper, sm_90, and
    later, with a Triton that has grid dependency control: 3.3 onwards)."""
    return (
        available(device)
        and torch.cuda.get_device_capability(device)[0] >= 9
        and hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")
    )
