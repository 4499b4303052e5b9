"""Decode probe (issue 6): where a decode step's time goes, on the GPU machine (PYTHONPATH=src).

  python benchmarks/decode_probe.py --preset 600m-A --batch 1 --out $OUT

Prints: whether CUDA graphs were skipped (inductor's counters), the engine's tokens/s (as bench decode
measures it), the compiled step alone in a loop of back-to-back launches (no host work: the floor of
this design), and a profile of a few engine steps (host time per step, GPU busy time per step).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from onebox.bench.decode import memory_bandwidth, time_decode, weight_bytes
from onebox.config import PRESETS
from onebox.infer.engine import Engine, Request
from onebox.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="600m-A")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build_model(PRESETS[args.preset], device, torch.bfloat16).eval()
    bound = args.batch * memory_bandwidth(device) / weight_bytes(model)
    engine = Engine(model, max_batch=args.batch, prefix_entries=0)
    speed = time_decode(engine, args.batch, 128, 128)
    skips = dict(torch._dynamo.utils.counters["inductor"])
    print(f"inductor counters: { {k: v for k, v in skips.items() if 'cudagraph' in k or 'skip' in k} }")
    print(f"engine: {speed:,.0f} tok/s = {speed / bound:.1%} of the bound ({bound:,.0f} tok/s)")

    with torch.inference_mode():  # the compiled step alone, launched back to back
        for _ in range(5):
            engine._decode()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            engine._decode()
        torch.cuda.synchronize()
        per = (time.perf_counter() - start) / 200
    print(f"step alone: {per * 1e3:.3f} ms = {args.batch / per:,.0f} tok/s = {args.batch / per / bound:.1%} of the bound")

    requests = [engine.submit(Request([1] * 32, 64, temperature=0)) for _ in range(args.batch)]
    engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
    while any(engine.slots):
        engine.step()
    assert all(r.finish_reason == "length" for r in requests)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (args.out / f"decode-probe-{args.preset}-{args.batch}.txt").write_text(table)
    print(table[:4000])
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 20
    print(f"GPU busy per step: {gpu / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
