"""Decode probe: where a decode step's time goes, on the GPU machine (PYTHONPATH=src).

  python benchmarks/decode_probe.py --preset 600m-A --batch 1 --variants plain,fused,fused+autotune --out $OUT

A variant is plain (separate q/k/v and gate/up products) or fused, optionally +autotune (torch.compile
mode max-autotune instead of reduce-overhead) and +math/+efficient/+cudnn (the SDPA kernel, forced), +gemv/+attention/+rope/+chain/+kernels
(onebox's Triton decode kernels, infer/decode.py, one or all; without them cuBLAS and SDPA), +pdl (inductor's
kernels with programmatic dependent launch), +kpdl (the Engine's `pdl` kernel option: onebox's GEMVs and inductor's kernels with
it), +sepmerge (with +rope: a merge kernel after the attention's chunks instead of the last chunk merging). For each it prints: whether CUDA graphs were skipped (inductor's counters), the engine's tokens/s (as bench decode
measures it), the compiled step alone in a loop of back-to-back launches (no host work: the floor of
this design), and a profile of a few engine steps (host time per step, GPU busy time per step).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from onebox.bench.decode import memory_bandwidth, time_decode, weight_bytes
from onebox.infer.engine import Engine, Request
from onebox.model import build_model
from onebox.presets import PRESETS


def probe(preset: str, batch: int, variant: str, out: Path) -> str:
    device = torch.device("cuda")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # +pdl: inductor's kernels launched with programmatic dependent launch (Hopper), so each can be
    # scheduled while the one before it finishes (torch's triton.enable_pdl; onebox's own kernels are not).
    if hasattr(torch._inductor.config.triton, "enable_pdl"):
        torch._inductor.config.triton.enable_pdl = "+pdl" in variant
    elif "+pdl" in variant:
        print(f"[{variant}] this torch's inductor has no triton.enable_pdl: measured without it")
    model = build_model(PRESETS[preset], device, torch.bfloat16).eval()
    bound = batch * memory_bandwidth(device) / weight_bytes(model)
    mode = "max-autotune" if "autotune" in variant else "reduce-overhead"
    engine = Engine(
        model,
        max_batch=batch,
        prefix_entries=0,
        compile=mode,
        fuse=variant.startswith("fused"),
        kernels=True
        if "+kernels" in variant
        else ",".join(k for k in ("gemv", "attention", "rope", "chain") if f"+{k}" in variant)
        + (",pdl" if "+kpdl" in variant else "")
        or False,
    )
    if "+sepmerge" in variant:  # +rope with a merge kernel after the chunks instead of the chunks merging themselves
        for cache in engine.caches:
            cache.counts = torch.zeros(0, dtype=torch.int32, device=device)
    backend = next((b for b in ("math", "efficient", "flash", "cudnn") if f"+{b}" in variant), None)
    if backend:  # the attention kernel SDPA picks for the decode step, forced
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = {
            "math": SDPBackend.MATH,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
        }[backend]
        eager = engine._decode_eager

        def step():
            with sdpa_kernel([chosen]):
                return eager()

        engine._decode = torch.compile(step, mode=mode, fullgraph=True)
    started = time.perf_counter()
    speed = time_decode(engine, batch, 128, 128)
    compiled = time.perf_counter() - started
    skips = {k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cudagraph" in k or "skip" in k}
    print(f"[{variant}] inductor counters {skips}; compile+decode {compiled:.0f} s")

    with torch.inference_mode():  # the compiled step alone, launched back to back
        for _ in range(5):
            engine._decode()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            engine._decode()
        torch.cuda.synchronize()
        alone = (time.perf_counter() - start) / 200

    requests = [engine.submit(Request([1] * 32, 64, temperature=0)) for _ in range(batch)]
    engine.step()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
    while any(engine.slots):
        engine.step()
    assert all(r.finish_reason == "length" for r in requests)
    kernels = [
        e
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
    ]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    gpu = sum(e.self_device_time_total for e in kernels) / 20
    lines = [f"[{variant}] GPU kernels per step: {sum(e.count for e in kernels) / 20:.0f}, busy {gpu / 1e3:.3f} ms"]
    for e in kernels[:18]:
        lines.append(f"  {e.self_device_time_total / 20:8.1f} us {e.count / 20:5.1f}x  {e.key[:110]}")
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    (out / f"decode-probe-{preset}-{batch}-{variant.replace('+', '-')}.txt").write_text("\n".join(lines) + "\n\n" + cpu)
    print("\n".join(lines))
    row = f"{variant:<16} {speed:8,.0f} tok/s {speed / bound:6.1%} of bound | step alone {alone * 1e3:.3f} ms ({batch / alone / bound:.1%})"
    del engine, model
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="600m-A")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variants", default="plain,fused")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    rows = []
    for variant in args.variants.split(","):
        rows.append(probe(args.preset, args.batch, variant, args.out))
        print(rows[-1], flush=True)  # each row as it comes: a timeout keeps the rows measured before it
    print(f"{args.preset} batch {args.batch}:")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
