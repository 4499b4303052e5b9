"""`onebox bench forward`: forward-only probes up a ladder of model sizes until one does not fit."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from onebox.bench.schema import config_record, new_document
from onebox.bench.timing import PhaseClock, median
from onebox.config import LADDER, preset
from onebox.device import format_bytes, memory_kind, peak_memory_bytes, reset_peak_memory
from onebox.model import Transformer, build_model

Say = Callable[[str], None]


def forward_dtype(device: torch.device, precision: str) -> torch.dtype:
    """Weights of a forward probe: bf16 on CUDA (no master copy is needed without training), else fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_random_model(config: Any, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A randomly initialised model built straight on the device in `dtype` (no host copy), in eval mode."""
    return build_model(config, device, dtype).eval()


def probe(config: Any, device: torch.device, dtype: torch.dtype, batch: int, passes: int, warmup: int) -> dict[str, Any]:
    """Time forward passes of one rung; status 'oom' when it does not fit."""
    weight_bytes = config.num_params() * torch.finfo(dtype).bits // 8
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    try:
        model = build_random_model(config, device, dtype)
        tokens = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)
        clock = PhaseClock(device)
        times = []
        with torch.inference_mode():
            for _ in range(warmup + passes):
                start = clock.mark()
                model(tokens)
                end = clock.mark()
                times.append((start, end))
        clock.finish()
        pass_ms = [clock.ms(s, e) for s, e in times[warmup:]]
        peak = peak_memory_bytes(device)
        del model, tokens
    except torch.cuda.OutOfMemoryError:
        return {"status": "oom", "weight_bytes": weight_bytes, "estimated_bytes": weight_bytes, "ms_per_pass": None, "pass_ms": [],
                "tokens_per_second": None, "peak_memory_bytes": None}
    ms = median(pass_ms)
    return {"status": "ok", "weight_bytes": weight_bytes, "ms_per_pass": ms, "pass_ms": pass_ms, "tokens_per_second": batch * config.seq_len * 1000.0 / ms,
            "peak_memory_bytes": peak, "memory_kind": memory_kind(device)}


def run_forward(names: list[str] | None, device: torch.device, precision: str, say: Say, batch: int = 1, passes: int = 3, warmup: int = 1) -> dict[str, Any]:
    """The `forward` document: one entry per rung, stopping at the first that does not fit."""
    names = names or list(LADDER)
    configs = [preset(n) for n in names]
    dtype = forward_dtype(device, precision)
    doc = new_document("forward", device, {"batch": batch, "passes": passes, "warmup": warmup, "dtype": str(dtype).replace("torch.", ""), "ladder": names})
    for config in configs:
        result = probe(config, device, dtype, batch, passes, warmup)
        doc["entries"].append({"config": config_record(config), "batch": batch, "result": result})
        if result["status"] == "oom":
            say(f"{config.name:<5} {config.num_params() / 1e9:5.1f}B  out of memory (weights alone {format_bytes(result['weight_bytes'])}): the forward ceiling")
            break
        say(f"{config.name:<5} {config.num_params() / 1e9:5.1f}B  {result['ms_per_pass']:,.1f} ms/pass ({config.seq_len * batch} tokens) | "
            f"{result['tokens_per_second']:,.0f} tok/s | peak {format_bytes(result['peak_memory_bytes'])}")
    return doc
