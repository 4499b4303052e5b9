"""`onebox bench forward`: forward-only probes up a ladder of model sizes until one does not fit."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from onebox.bench.schema import config_record, new_document
from onebox.bench.timing import PhaseClock, median
from onebox.device import (
    format_bytes,
    memory_kind,
    peak_memory_bytes,
    reset_peak_memory,
)
from onebox.infer.stream import build_streamed
from onebox.model import Transformer, build_model
from onebox.presets import FORWARD_LADDER, preset

Say = Callable[[str], None]


def forward_dtype(device: torch.device, precision: str) -> torch.dtype:
    """Weights of a forward probe: bf16 on CUDA (no master copy is needed without training), else fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_random_model(config: Any, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A randomly initialised model built straight on the device in `dtype` (no host copy), in eval mode."""
    return build_model(config, device, dtype).eval()


def device_budget(device: torch.device) -> int | None:
    """Bytes of weights a forward probe may keep on the device (None: no limit, e.g. the CPU's RAM)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(0.9 * free) - 2 * 2**30  # activations, logits and the allocator's slack


def h2d_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 3) -> float | None:
    """Measured bytes/s of pinned host-to-device copies (None off CUDA)."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    clock = PhaseClock(device)
    marks = []
    for _ in range(repeats + 1):
        start = clock.mark()
        target.copy_(host, non_blocking=True)
        marks.append((start, clock.mark()))
    clock.finish()
    return nbytes / (median([clock.ms(a, b) for a, b in marks[1:]]) / 1000.0)


def _time_passes(
    model: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, device: torch.device, passes: int, warmup: int
) -> list[float]:
    clock = PhaseClock(device)
    times = []
    with torch.inference_mode():
        for _ in range(warmup + passes):
            start = clock.mark()
            model(tokens)
            times.append((start, clock.mark()))
    clock.finish()
    return [clock.ms(s, e) for s, e in times[warmup:]]


def resident_blocks(config: Any, dtype: torch.dtype, budget: int) -> int:
    """How many blocks fit beside the embedding, output layer and two streaming buffers."""
    itemsize = torch.finfo(dtype).bits // 8
    block = (
        (config.num_params() - config.vocab_size * config.dim * (1 if config.tie_embeddings else 2) - config.dim)
        // config.layers
        * itemsize
    )
    rest = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2) * itemsize + 2 * block
    return max(0, min(config.layers, (budget - rest) // block))


def probe(
    config: Any,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    passes: int,
    warmup: int,
    budget: int | None = None,
    bandwidth: float | None = None,
) -> dict[str, Any]:
    """Time forward passes of one rung: resident when its weights fit `budget`, else with blocks streamed
    from host memory; status 'oom' when even that fails."""
    weight_bytes = config.num_params() * torch.finfo(dtype).bits // 8
    streamed = budget is not None and weight_bytes > budget
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    extra: dict[str, Any] = {"streamed": streamed}
    try:
        tokens = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)
        if streamed:
            model = build_streamed(config, device, dtype, resident_blocks(config, dtype, budget))
            extra.update(
                resident_blocks=model.resident, streamed_blocks=len(model.streamed), streamed_bytes=model.streamed_bytes
            )
        else:
            model = build_random_model(config, device, dtype)
        pass_ms = _time_passes(model, tokens, device, passes, warmup)
        peak = peak_memory_bytes(device)
        del model, tokens
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # RuntimeError: pinned host memory that cannot be had
        if not isinstance(err, torch.cuda.OutOfMemoryError) and "out of memory" not in str(err).lower():
            raise
        return {
            "status": "oom",
            "weight_bytes": weight_bytes,
            "estimated_bytes": weight_bytes,
            "ms_per_pass": None,
            "pass_ms": [],
            "tokens_per_second": None,
            "peak_memory_bytes": None,
            **extra,
        }
    ms = median(pass_ms)
    if streamed and bandwidth:
        floor = extra["streamed_bytes"] / bandwidth * 1000.0
        extra.update(h2d_bytes_per_second=bandwidth, floor_ms=floor, over_floor=ms / floor)
    return {
        "status": "ok",
        "weight_bytes": weight_bytes,
        "ms_per_pass": ms,
        "pass_ms": pass_ms,
        "tokens_per_second": batch * config.seq_len * 1000.0 / ms,
        "peak_memory_bytes": peak,
        "memory_kind": memory_kind(device),
        **extra,
    }


def run_forward(
    names: list[str] | None,
    device: torch.device,
    precision: str,
    say: Say,
    batch: int = 1,
    passes: int = 3,
    warmup: int = 1,
    budget: int | None = None,
) -> dict[str, Any]:
    """The `forward` document: one entry per rung, stopping at the first that does not fit.

    Rungs whose weights exceed the device's budget (its free memory, or `budget` when given) run with
    blocks streamed from pinned host memory, next to the floor the measured copy bandwidth sets.
    """
    names = names or list(FORWARD_LADDER)
    configs = [preset(n) for n in names]
    dtype = forward_dtype(device, precision)
    bandwidth = h2d_bandwidth(device)
    doc = new_document(
        "forward",
        device,
        {
            "batch": batch,
            "passes": passes,
            "warmup": warmup,
            "dtype": str(dtype).replace("torch.", ""),
            "ladder": names,
            "h2d_bytes_per_second": bandwidth,
        },
    )
    for config in configs:
        result = probe(
            config,
            device,
            dtype,
            batch,
            passes,
            warmup,
            budget if budget is not None else device_budget(device),
            bandwidth,
        )
        doc["entries"].append({"config": config_record(config), "batch": batch, "result": result})
        if result["status"] == "oom":
            say(
                f"{config.name:<5} {config.num_params() / 1e9:5.1f}B  out of memory (weights alone {format_bytes(result['weight_bytes'])}): the forward ceiling"
            )
            break
        how = ""
        if result["streamed"]:
            how = f" | {result['streamed_blocks']} of {config.layers} blocks streamed ({format_bytes(result['streamed_bytes'])})"
            if "floor_ms" in result:
                how += f", floor {result['floor_ms']:,.0f} ms at {result['h2d_bytes_per_second'] / 1e9:.1f} GB/s: {result['over_floor']:.2f}x"
        say(
            f"{config.name:<5} {config.num_params() / 1e9:5.1f}B  {result['ms_per_pass']:,.1f} ms/pass ({config.seq_len * batch} tokens) | "
            f"{result['tokens_per_second']:,.0f} tok/s | peak {format_bytes(result['peak_memory_bytes'])}{how}"
        )
    return doc
