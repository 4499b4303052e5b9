"""Scaling probe: FSDP2 settings side by side on several GPUs, under torchrun (PYTHONPATH=src).

  torchrun --standalone --nproc-per-node 2 benchmarks/scaling_probe.py --preset 3b-A --batch 8 \
      --variants base,noreshard,bf16reduce,prefetch2 --one 21965

A variant joins options with '+': base (what `onebox train` does, built the same way: blocks resharded
after forward or not as planned for the memory, the last one kept, blocks per FSDP2 unit as planned
(plan.units_of), fp32 gradient reduction), reshard
(every block but the last resharded after forward), lastreshard (the last block resharded too),
noreshard (no block resharded: no all-gather in backward, the gathered bf16 weights held from forward
to backward),
bf16reduce (gradients reduce-scattered in bf16), prefetchN (all-gathers issued N blocks ahead; one block per
unit), groupN (N blocks per FSDP2 unit), autogc (Python's collector left on during the steps).
Rank 0 prints one row per variant: ms per step by phase, tokens/s per process, the efficiency against
`--one` (one GPU's tokens/s from `onebox bench validate` in the same call), and peak memory.
`--profile VARIANT,...` then profiles 3 steps of each on every rank (GPU kernels on CUDA; on the CPU all is idle) and prints one line per rank:
the step's wall time, the GPU's time busy with compute kernels, with NCCL kernels (and NCCL alone, not
overlapped by compute), and idle: where the ranks wait on each other or on the host.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import time
from pathlib import Path

import torch

from onebox.bench.training import BenchSettings, build_onebox, contender_step, measure_training, synthetic_batch
from onebox.config import ModelConfig
from onebox.device import pick_device, synchronize
from onebox.distributed import init_distributed, shutdown
from onebox.presets import PRESETS
from onebox.training.recipe import Recipe


class _CollectorOn:
    """The recipe's optimizer with Python's collector turned back on after each step (the benchmarks turn
    it off around the steps)."""

    def __init__(self, optimizer) -> None:
        self.optimizer, self.param_groups = optimizer, optimizer.param_groups

    def step(self, clip: float) -> None:
        self.optimizer.step(clip)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
        gc.enable()


def builder(variant: str):
    """The probe's build of one variant: onebox's own multi-process build (the recipe, as `onebox train`
    under torchrun builds it) with the variant's FSDP2 settings."""
    options = set(variant.split("+"))
    prefetch = next((int(m.group(1)) for o in options if (m := re.fullmatch(r"prefetch(\d+)", o))), 0)
    group = next((int(m.group(1)) for o in options if (m := re.fullmatch(r"group(\d+)", o))), None)  # None: as planned
    reshard = False if "noreshard" in options else True if "reshard" in options else None  # None: as planned

    def build(config: ModelConfig, device: torch.device, settings: BenchSettings) -> Recipe:
        recipe = build_onebox(
            config,
            device,
            settings,
            reshard=reshard,
            keep_last="lastreshard" not in options,
            reduce_dtype=torch.bfloat16 if "bf16reduce" in options else torch.float32,
            prefetch=prefetch,
            **({} if group is None else {"group": group}),
        )
        if "autogc" in options:
            recipe.optimizer = _CollectorOn(recipe.optimizer)
        return recipe

    return build


def covered(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


SYNC_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "cudaStreamWaitEvent",
)


def cpu_set(cpus: set[int]) -> str:
    """A CPU set as ranges: {0,1,2,5} -> '0-2,5'."""
    ranges, run = [], []
    for cpu in sorted(cpus):
        if run and cpu != run[-1] + 1:
            ranges.append(run)
            run = []
        run.append(cpu)
    ranges.append(run)
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in ranges if r)


def profile_ranks(variant: str, config: ModelConfig, device: torch.device, settings: BenchSettings, rank: int) -> str:
    """This rank's lines: wall ms per step and the GPU's busy time by kind over 3 profiled steps; then the
    host's side: the time it took to issue a step (no sync inside a step, so a host that keeps ahead of its
    GPU issues faster than the step's wall time), its time blocked in CUDA calls that wait, the CPUs it may
    run on, and its largest CPU costs by self time."""
    torch._dynamo.reset()
    torch.manual_seed(settings.seed)
    contender = builder(variant)(config, device, settings)
    x, y = synthetic_batch(config, settings.batch, device, settings.seed + rank)
    for _ in range(6):
        contender_step(contender, x, y)
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    issue = 0.0
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(3):
            begun = time.perf_counter()
            contender_step(contender, x, y)
            issue += time.perf_counter() - begun
        synchronize(device)
        wall = (time.perf_counter() - start) / 3 * 1e6
    kernels = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    nccl = [(a, b) for name, a, b in kernels if "nccl" in name.lower()]
    compute = [(a, b) for name, a, b in kernels if "nccl" not in name.lower()]
    every = covered(nccl + compute) / 3
    busy_compute, busy_nccl = covered(compute) / 3, covered(nccl) / 3
    averages = [a for a in prof.key_averages() if a.device_type == torch.autograd.DeviceType.CPU]
    blocked = sum(a.self_cpu_time_total for a in averages if a.key.startswith(SYNC_CALLS)) / 3
    top = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)[:8]
    costs = ", ".join(f"{a.key[:40]} {a.self_cpu_time_total / 3e3:.1f} ({a.count // 3})" for a in top)
    affinity = cpu_set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
    return (
        f"{variant} rank {rank}: step {wall / 1e3:.1f} ms | compute {busy_compute / 1e3:.1f} ms | nccl {busy_nccl / 1e3:.1f} ms "
        f"(alone {(every - busy_compute) / 1e3:.1f}) | idle {(wall - every) / 1e3:.1f} ms\n"
        f"  host: issued a step in {issue / 3 * 1e3:.1f} ms, blocked {blocked / 1e3:.1f} ms, cpus {affinity} "
        f"(visible GPUs {os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}, GPU {device})\n"
        f"  host self-time per step, ms (calls): {costs}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="3b-A")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default="base,noreshard,bf16reduce")
    parser.add_argument("--one", type=float, default=0.0, help="one GPU's tokens/s, for the efficiency column")
    parser.add_argument("--profile", default="", help="comma-separated variants to profile on every rank (CUDA)")
    parser.add_argument("--out", default="/tmp/out")
    args = parser.parse_args()
    ranks, device_name = init_distributed("auto")
    device = pick_device(device_name)
    rows = []
    try:
        for variant in args.variants.split(","):
            result = measure_training(
                "onebox",
                PRESETS[args.preset],
                device,
                BenchSettings(batch=args.batch, steps=10, timed_steps=10),
                build=builder(variant),
                ranks=ranks,
            )
            if ranks.main:
                per = result["tokens_per_second"] / ranks.world if result["tokens_per_second"] else None
                eff = f"{per / args.one:.1%}" if per and args.one else "n/a"
                row = (
                    f"{variant:28s} {result['status']:6s} {result['ms_per_step'] or 0:7.1f} ms (fwd {result['forward_ms'] or 0:5.1f} bwd {result['backward_ms'] or 0:6.1f} "
                    f"opt {result['optimizer_ms'] or 0:5.1f}) | {per or 0:9,.0f} tok/s/proc | eff {eff} | mem {(result['peak_memory_bytes'] or 0) / 1e9:.1f} GB"
                )
                print(row, flush=True)
                rows.append({"variant": variant, **{k: v for k, v in result.items() if k != "loss_trace"}})
        for variant in filter(None, args.profile.split(",")):
            line = profile_ranks(variant, PRESETS[args.preset], device, BenchSettings(batch=args.batch), ranks.rank)
            lines = [None] * ranks.world
            torch.distributed.all_gather_object(lines, line)
            if ranks.main:
                print("\n".join(lines), flush=True)
        if ranks.main:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, f"scaling-probe-{args.preset}.json").write_text(json.dumps(rows, indent=1))
    finally:
        shutdown(ranks)


if __name__ == "__main__":
    main()
