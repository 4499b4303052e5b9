"""`onebox bench dims`: time per FLOP of one transformer layer across widths, to find efficiency cliffs."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from onebox.bench.schema import new_document
from onebox.bench.timing import PhaseClock, median
from onebox.config import ModelConfig
from onebox.device import autocast, autocast_dtype
from onebox.model import Block
from onebox.rope import model_rope_tables

Say = Callable[[str], None]
HIDDEN_RATIO = 8 / 3  # hidden/dim of the LLaMA family (600m-A: 4096/1536)


def layer_config(dim: int, ratio: float = HIDDEN_RATIO, seq: int = 512, head_dim: int = 128) -> ModelConfig:
    """One layer's shape at width dim: hidden = ratio x dim rounded to 128, head size 128."""
    hidden = max(128, round(dim * ratio / 128) * 128)
    return ModelConfig(
        name=f"layer-{dim}", dim=dim, hidden=hidden, layers=1, heads=max(1, dim // head_dim), seq_len=seq
    ).validate()


def layer_flops(config: ModelConfig, tokens: int) -> int:
    """Forward+backward FLOPs of one layer: 6 x matmul weights x tokens + 12 d seq x tokens (attention)."""
    return 6 * config.matmul_params_per_layer() * tokens + 12 * config.dim * config.seq_len * tokens


def time_layer(config: ModelConfig, device: torch.device, precision: str, batch: int, iters: int, warmup: int) -> float:
    """Median ms of forward+backward through one block (fp32 weights, the training precision policy)."""
    with torch.device(device):
        block = Block(config)
        x = torch.randn(batch, config.seq_len, config.dim, requires_grad=True)
        grad = torch.randn(batch, config.seq_len, config.dim)
    cos, sin = (t.to(device) for t in model_rope_tables(config))
    dtype = autocast_dtype(device, precision)
    clock = PhaseClock(device)
    marks = []
    for _ in range(warmup + iters):
        start = clock.mark()
        with autocast(device, dtype):
            out = block(x, cos, sin)
        out.backward(grad)
        marks.append((start, clock.mark()))
    clock.finish()
    times = [clock.ms(s, e) for s, e in marks[warmup:]]
    del block, x, grad
    gc.collect()
    return median(times)


def find_cliffs(points: list[dict[str, Any]], noise: float) -> list[dict[str, Any]]:
    """Steps between neighbouring widths where time per FLOP gets worse by more than the noise allows."""
    threshold = max(3 * noise, 0.02)
    cliffs = []
    for before, after in zip(points, points[1:]):
        ratio = after["ns_per_gflop"] / before["ns_per_gflop"]
        if ratio - 1 > threshold:
            cliffs.append(
                {"from_dim": before["dim"], "to_dim": after["dim"], "ratio": ratio, "threshold": 1 + threshold}
            )
    return cliffs


def run_dims(
    dims: list[int],
    device: torch.device,
    precision: str,
    say: Say,
    batch: int = 16,
    seq: int = 512,
    repeats: int = 3,
    iters: int = 5,
    warmup: int = 2,
) -> dict[str, Any]:
    """The `dims` document: each width timed `repeats` times (interleaved), noise, and the cliffs."""
    doc = new_document(
        "dims",
        device,
        {
            "dims": dims,
            "batch": batch,
            "seq": seq,
            "hidden_ratio": HIDDEN_RATIO,
            "repeats": repeats,
            "iters": iters,
            "precision": precision,
        },
    )
    configs = [layer_config(d, seq=seq) for d in dims]
    runs: dict[int, list[float]] = {d: [] for d in dims}
    for round_index in range(repeats):  # interleaved, so drift in clocks or heat shows up as noise
        for config in configs:
            runs[config.dim].append(time_layer(config, device, precision, batch, iters, warmup))
        say(f"pass {round_index + 1}/{repeats} done")
    tokens = batch * seq
    for config in configs:
        times = runs[config.dim]
        ms = median(times)
        flops = layer_flops(config, tokens)
        point = {
            "dim": config.dim,
            "hidden": config.hidden,
            "heads": config.heads,
            "ms": ms,
            "runs_ms": times,
            "flops": flops,
            "ns_per_gflop": ms * 1e6 / (flops / 1e9),
            "tflops_per_second": flops / (ms / 1000) / 1e12,
            "spread": (max(times) - min(times)) / ms,
        }
        doc["entries"].append(point)
        say(
            f"dim {config.dim:>5} hidden {config.hidden:>6}: {ms:8.2f} ms  {point['tflops_per_second']:7.1f} TFLOP/s  spread {point['spread']:.1%}"
        )
    noise = median([p["spread"] for p in doc["entries"]])
    doc["noise"] = noise
    doc["cliffs"] = find_cliffs(doc["entries"], noise)
    for cliff in doc["cliffs"]:
        say(
            f"cliff: dim {cliff['from_dim']} -> {cliff['to_dim']}: time per FLOP x{cliff['ratio']:.2f} (noise threshold x{cliff['threshold']:.2f})"
        )
    if not doc["cliffs"]:
        say(f"no cliff beyond the noise (median spread {noise:.1%})")
    return doc
