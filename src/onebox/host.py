"""The host side of a run: Python's garbage collector on the loop's own schedule, and page-locked host
memory of exactly the size asked for (for asynchronous copies to and from a GPU)."""

from __future__ import annotations

import contextlib
import gc
import mmap
import weakref
from typing import Any

import torch

GC_EVERY = 50  # steps between the training loop's own collections of the young generations


@contextlib.contextmanager
def steady_collection() -> Any:
    """Python's automatic garbage collection off for the block (a full collection first), as torchtitan
    does: a collection of the oldest generation, over torch.compile's and FSDP2's many objects, can
    pause the host for tens of milliseconds at a moment of its own choosing, and under several processes
    every other rank then waits for the paused one. The training loop collects the young generations
    itself every GC_EVERY steps, at the same step on every rank (`collect_young`)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def collect_young(step: int) -> None:
    """The loop's scheduled collection of generations 0 and 1 (see steady_collection), and of all
    generations every 20th time, so cycles that reached the oldest one are still freed in long runs."""
    if step % (20 * GC_EVERY) == 0:
        gc.collect()
    elif step % GC_EVERY == 0:
        gc.collect(1)


def pinned_zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Zeros in page-locked host memory of their own size, for fast asynchronous copies to a GPU.

    torch's pinned-memory allocator (pin_memory=True) rounds every block up to a power of two, which at
    20B parameters of optimizer state asks for ~1.5x the bytes, more than a 128 GB host has. So the pages
    are an anonymous mapping of exactly the size needed (rounded to whole pages), registered with CUDA
    (cudaHostRegister), and unregistered when the returned tensor is freed, so whoever keeps the storage
    must keep this tensor."""
    numel = int(torch.Size(shape).numel())
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    span = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    pages = mmap.mmap(-1, span)  # anonymous: page-aligned, zero-filled, shared with no other allocation
    flat = torch.frombuffer(pages, dtype=torch.uint8)  # the tensor keeps the mapping alive
    cudart = torch.cuda.cudart()
    error = int(cudart.cudaHostRegister(flat.data_ptr(), span, 0))
    if error != 0:
        raise RuntimeError(
            f"out of memory: cudaHostRegister of {nbytes / 2**30:.2f} GiB of host memory failed (CUDA error {error})"
        )
    out = flat[:nbytes].view(dtype).view(shape)
    weakref.finalize(out, cudart.cudaHostUnregister, flat.data_ptr())
    return out
