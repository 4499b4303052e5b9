"""`onebox plan`: each memory strategy's predicted GPU and host memory, and the one training would use."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from onebox.cli.common import DEVICE_HELP, console
from onebox.errors import OneboxError


def _plan_ladder(machine: Any, batch: int, on_gpu: bool, gpus: int) -> int:
    from onebox.plan import plan
    from onebox.presets import LADDER, SHARDED_LADDER, preset

    table = Table(title=f"training ceiling by the planner, batch {batch}, on {machine.label}{_per_process(gpus)}")
    for column in ("rung", "params", "strategy", "GPU GB" if on_gpu else "RAM GB", "host GB"):
        table.add_column(column, justify="left" if column in ("rung", "strategy") else "right")
    ceiling = None
    ladder = LADDER if gpus == 1 else SHARDED_LADDER
    for name in ladder:
        config = preset(name)
        chosen, predictions = plan(config, batch, machine, compiled=on_gpu, mixed=on_gpu, shards=gpus)
        shown = next((p for p in predictions if p.strategy == chosen), predictions[-1])
        table.add_row(
            name,
            f"{config.num_params() / 1e9:.1f}B",
            chosen.name if chosen else "does not fit",
            f"{shown.gpu / 1e9:.1f}",
            f"{shown.host / 1e9:.1f}",
        )
        ceiling = name if chosen else ceiling
    console.print(table)
    top = " (the top of the ladder)" if ceiling == ladder[-1] else ""
    console.print(
        f"predicted training ceiling: {ceiling or 'below the ladder (5b)'}{top} (an estimate: `onebox bench ceiling` measures it)",
        highlight=False,
    )
    return 0


def _per_process(gpus: int) -> str:
    return f" (per process of {gpus}, FSDP2; host memory shared)" if gpus > 1 else ""


def cmd_plan(args: argparse.Namespace) -> int:
    from onebox.config import apply_overrides
    from onebox.device import pick_device
    from onebox.plan import (
        GPU_HEADROOM,
        HOST_HEADROOM,
        MachineMemory,
        fits,
        machine_memory,
        plan,
    )
    from onebox.presets import preset

    if args.gpus < 1:
        raise OneboxError(f"--gpus {args.gpus}: plan for 1 or more processes (one per GPU).")
    machine = machine_memory(pick_device(args.device))
    if args.gpu_memory is not None or args.host_memory is not None:
        gpu = machine.gpu if args.gpu_memory is None else int(args.gpu_memory * 1e9)
        host = machine.host if args.host_memory is None else int(args.host_memory * 1e9)
        machine = MachineMemory(
            gpu, host, f"{'no GPU' if gpu is None else f'{gpu / 1e9:.0f} GB GPU'}, {host / 1e9:.0f} GB host (as given)"
        )
    on_gpu = machine.gpu is not None  # bf16 autocast and compiled blocks there, fp32 eager on the CPU
    if args.ladder:
        return _plan_ladder(machine, args.batch, on_gpu, args.gpus)
    if not args.preset:
        raise OneboxError(
            "onebox plan needs --preset NAME (one model) or --ladder (the training ceiling of this machine)."
        )
    config = preset(args.preset)
    if args.seq_len:
        config = apply_overrides(config, {"seq_len": args.seq_len})
    chosen, predictions = plan(
        config,
        args.batch,
        machine,
        compiled=on_gpu,
        optimizer=args.optimizer,
        grad_accum=args.grad_accum,
        mixed=on_gpu,
        shards=args.gpus,
    )
    gb = 1e9
    table = Table(
        title=f"{config.name}: {config.num_params() / 1e9:.2f}B params, batch {args.batch} x seq {config.seq_len} on {machine.label}"
        f"{_per_process(args.gpus)}"
    )
    for column in (
        "strategy",
        "GPU GB" if on_gpu else "RAM GB",
        "weights",
        "optim",
        "activ",
        "grads",
        "host GB",
        "fits",
    ):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for p in predictions:
        table.add_row(
            p.strategy.name,
            f"{p.gpu / gb:.1f}",
            f"{p.weights / gb:.1f}",
            f"{p.optimizer / gb:.1f}",
            f"{p.activations / gb:.1f}",
            f"{p.gradients / gb:.1f}",
            f"{p.host / gb:.1f}",
            "yes" if fits(p, machine, args.gpus) else "no",
        )
    console.print(table)
    for p in predictions:
        console.print(f"  {p.strategy.name}: {p.strategy.summary}", highlight=False)
    limits = f"usable: {GPU_HEADROOM:.0%} of GPU memory, {HOST_HEADROOM:.0%} of host RAM"
    if chosen is None:
        console.print(
            f"nothing fits ({limits}): lower --batch or --seq-len, or choose a smaller preset.", highlight=False
        )
        return 1
    console.print(
        f"planned: [bold]{chosen.name}[/bold], the fastest strategy that fits ({limits}); `onebox train` uses it "
        f"with --memory auto, or name one with --memory.",
        highlight=False,
    )
    return 0


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan", help="predicted GPU and host memory of each training memory strategy, and the one training would use"
    )
    p.add_argument("--preset", help="the model to plan for")
    p.add_argument(
        "--ladder",
        action="store_true",
        help="plan every rung of the ladder (5b..30b; with --gpus N > 1 on to 60b): the predicted training ceiling",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq-len", type=int, help="override the preset's sequence length")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--gpu-memory", type=float, metavar="GB", help="plan for a GPU of this many GB instead of this machine's"
    )
    p.add_argument(
        "--host-memory", type=float, metavar="GB", help="plan for this much host RAM instead of this machine's"
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="plan for this many FSDP2 processes, one per GPU, sharing this host (default 1)",
    )
    p.set_defaults(func=cmd_plan)
