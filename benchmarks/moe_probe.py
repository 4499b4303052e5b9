"""MoE probe: one sparse block's forward + backward at a real model's layer shape, each way of computing
the experts timed on the same tokens and routing.

  PYTHONPATH=src python benchmarks/moe_probe.py --preset qwen3-30b-a3b --tokens 8192 [--device cuda]
  PYTHONPATH=src python benchmarks/moe_probe.py --preset qwen3-30b-a3b --decode 1,8

--decode: a decode step's block (one token a row) forward only, each way captured in a CUDA graph and
replayed: gathered (the chosen experts' weights gathered, then batched products), grouped (the grouped
GEMM reading them in place) and kernel (the decode model's expert kernel: each pair's expert read in
place, SwiGLU fused), as microseconds and GB/s of the distinct experts' bytes.

grouped: tokens sorted by expert, one grouped GEMM per product (torch._grouped_mm); looped: the same sort,
one product per expert (the reference). Weights bf16, routing from random weights (near-uniform: every
expert gets about tokens x top-k / experts rows). Prints ms per forward + backward, the TFLOP/s of the
experts' products and the two paths' largest output difference.
"""

from __future__ import annotations

import argparse
import json

import torch

from onebox.infer.decode import DecodeMoE
from onebox.moe import MoE, grouped_mm_runs
from onebox.presets import preset


def time_path(block: MoE, x: torch.Tensor, path: str, repeats: int) -> tuple[float, torch.Tensor]:
    """Median ms of forward + backward through `path`, and its output."""
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        chosen, weights = block.route(flat)
    grad = torch.randn_like(flat)
    times = []
    for i in range(repeats + 2):
        block.zero_grad(set_to_none=True)
        xin = flat.detach().requires_grad_(True)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = getattr(block, path)(xin, chosen, weights)
        out.backward(grad)
        stop.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2], out.detach()


def time_decode_step(block: MoE, rows: int, few: str, repeats: int = 50) -> float:
    """Microseconds of one block forward of `rows` tokens, captured in a CUDA graph and replayed; `few`:
    gathered or grouped (moe.MoE's ways) or kernel (the decode model's expert kernel)."""
    block.few = "gathered" if few == "kernel" else few
    block = DecodeMoE(block) if few == "kernel" else block
    x = torch.randn(rows, 1, block.gate_up.shape[-1], device=block.gate_up.device, dtype=block.gate_up.dtype)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                block(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            block(x)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(repeats):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1000 / repeats


def decode_table(block: MoE, config, batches: list[int]) -> list[dict]:
    rows = []
    per_expert = 3 * config.dim * config.expert_hidden * 2
    for batch in batches:
        distinct = config.experts * (1 - (1 - config.experts_per_token / config.experts) ** batch)
        row = {"batch": batch}
        for few in ("gathered", "grouped", "kernel"):
            us = time_decode_step(block, batch, few)
            row[few] = {"us": us, "gb_per_s": distinct * per_expert / us / 1e3}
            print(f"batch {batch} {few:8s} {us:8.1f} us = {row[few]['gb_per_s']:7.1f} GB/s of the experts read")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--decode", help="batch sizes of a decode step to time instead (e.g. 1,8)")
    parser.add_argument("--out")
    args = parser.parse_args()
    config = preset(args.preset)
    device = torch.device(args.device)
    torch.manual_seed(0)
    block = MoE(config).to(device, torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    if args.decode:
        rows = decode_table(block.eval(), config, [int(b) for b in args.decode.split(",")])
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"preset": config.name, "decode": rows}, f, indent=1)
        return
    x = torch.randn(args.tokens, config.dim, device=device, dtype=torch.bfloat16)
    flops = 6 * args.tokens * config.experts_per_token * 3 * config.dim * config.expert_hidden  # fwd + bwd products
    row = {"preset": config.name, "tokens": args.tokens, "device": torch.cuda.get_device_name(device)}
    paths = ["looped"] + (["grouped"] if grouped_mm_runs(device, torch.bfloat16) else [])
    outs = {}
    for path in paths:
        ms, outs[path] = time_path(block, x, path, args.repeats)
        row[path] = {"ms": ms, "tflops": flops / ms / 1e9}
        print(f"{path:8s} {ms:8.2f} ms forward + backward = {flops / ms / 1e9:6.1f} TFLOP/s of expert products")
    if "grouped" in outs:
        diff = (outs["grouped"].float() - outs["looped"].float()).abs().max().item()
        row["max_abs_diff"] = diff
        print(f"grouped / looped: {row['looped']['ms'] / row['grouped']['ms']:.2f}x faster, max abs diff {diff:.2e}")
    else:
        print("grouped: n/a (no grouped GEMM for this device and dtype)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
