"""`onebox bench`: validate, sweep, forward, ceiling, decode, serve, dims (each writes one result document)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from onebox.cli.chat import add_expert_flags
from onebox.cli.common import DEVICE_HELP, console, errors, overrides, say
from onebox.config import COMPILE_SETTINGS, MEMORY_SETTINGS, PRECISIONS, ModelConfig
from onebox.errors import OneboxError


def _write_result(doc: dict[str, Any], out: str | None, label: str) -> None:
    from onebox.bench.schema import (
        default_result_path,
        seal,
        validate_document,
        write_document,
    )

    path = write_document(doc, out or default_result_path(doc, label))
    console.print(f"result written to {path}", highlight=False)
    problems = validate_document(seal(doc))  # the same sealing write_document applied
    if problems:
        errors.print(
            "[yellow]this result would be rejected by `onebox results add`:[/yellow] " + "; ".join(problems),
            highlight=False,
        )


def _bench_settings(args: argparse.Namespace, batch: int):
    from onebox.bench.training import BenchSettings

    return BenchSettings(
        batch=batch,
        steps=args.steps,
        timed_steps=args.timed_steps,
        precision=args.precision,
        compile=args.compile,
        lr=args.lr,
        memory=args.memory,
    ).validate()


def cmd_bench_validate(args: argparse.Namespace) -> int:
    from onebox.bench.validate import run_validate
    from onebox.config import apply_overrides
    from onebox.device import pick_device
    from onebox.presets import preset

    config = apply_overrides(preset(args.preset), overrides(args, "model")).validate()
    settings = _bench_settings(args, args.batch)
    doc = run_validate(config, pick_device(args.device), settings, args.baseline, say)
    if args.gpus is not None and args.gpus > 1:
        from onebox.bench.validate import add_scaling

        add_scaling(doc, args.gpus, config, args.device, settings, say)
    _write_result(doc, args.out, config.name)
    return 0 if doc["entries"][0]["result"]["status"] == "ok" else 1


def cmd_bench_sweep(args: argparse.Namespace) -> int:
    from onebox.bench.validate import run_sweep
    from onebox.device import pick_device

    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    doc = run_sweep(
        scales, pick_device(args.device), _bench_settings(args, args.batch or 1), args.baseline, say, batch=args.batch
    )
    _write_result(doc, args.out, "-".join(scales))
    return 0


def cmd_bench_forward(args: argparse.Namespace) -> int:
    from onebox.bench.forward import run_forward
    from onebox.device import pick_device

    ladder = [s.strip() for s in args.ladder.split(",")] if args.ladder else None
    doc = run_forward(ladder, pick_device(args.device), args.precision, say, batch=args.batch, passes=args.passes)
    _write_result(doc, args.out, "ladder")
    return 0


def cmd_bench_ceiling(args: argparse.Namespace) -> int:
    from onebox.bench.ceiling import run_ceiling
    from onebox.device import pick_device

    if args.steps < 2 or args.batch < 1:
        raise OneboxError("bench ceiling needs --steps >= 2 (the loss must be seen to fall) and --batch >= 1.")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise OneboxError(f"--gpu-memory {args.gpu_memory:g}: give the GB of each GPU to train within, more than 0.")
    limit = None if args.gpu_memory is None else int(args.gpu_memory * 1e9)
    ladder = [s.strip() for s in args.ladder.split(",")] if args.ladder else None
    processes = args.gpus or 1
    doc = run_ceiling(
        ladder,
        pick_device(args.device),
        say,
        batch=args.batch,
        steps=args.steps,
        memory=args.memory,
        lr=args.lr,
        processes=processes,
        device_setting=args.device,
        gpu_limit=limit,
    )
    _write_result(doc, args.out, "ladder")
    return 0


def _inference_model(args: argparse.Namespace, what: str) -> Any:
    """The model a decode or serve benchmark runs: a preset's random weights or a saved model, bf16 on CUDA."""
    import torch

    from onebox.device import pick_device
    from onebox.infer.generate import load_model
    from onebox.model import build_model
    from onebox.presets import preset

    if bool(args.preset) == bool(args.model):
        raise OneboxError(
            f"bench {what} needs exactly one of --preset NAME (random weights) or --model PATH (a checkpoint, run or HF folder)."
        )
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.preset:
        return build_model(preset(args.preset), device, dtype).eval()
    return load_model(args.model, device, dtype)[0]


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise OneboxError(f"{flag} expects comma-separated integers, got {text!r}.") from None
    if not values or min(values) < 1:
        raise OneboxError(f"{flag} values must be at least 1.")
    return values


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from onebox.bench.serve import run_serve_bench

    clients = _int_list(args.clients, "--clients")
    model = _inference_model(args, "serve")
    doc = run_serve_bench(model, say, clients, args.max_tokens, args.prompt_len)
    _write_result(doc, args.out, model.config.name)
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from onebox.bench.decode import run_decode

    batches = _int_list(args.batches, "--batches")
    model = _inference_model(args, "decode")
    kernels = {"auto": None, "none": False}.get(args.kernels, args.kernels)
    doc = run_decode(
        model,
        model.embed_tokens.weight.device,
        say,
        batches,
        args.prompt_len,
        args.new_tokens,
        baseline=args.baseline == "hf",
        kernels=kernels,
    )
    _write_result(doc, args.out, model.config.name)
    return 0


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from onebox.bench.moe import preset_folder, run_moe
    from onebox.bench.schema import write_document
    from onebox.cli.chat import expert_options
    from onebox.device import pick_device

    if bool(args.preset) == bool(args.model):
        raise OneboxError("bench moe needs exactly one of --preset NAME (random weights) or --model HF_FOLDER.")
    folder = Path(args.model) if args.model else preset_folder(args.preset, args.work_dir)
    doc = run_moe(
        folder,
        pick_device(args.device),
        say,
        _int_list(args.batches, "--batches"),
        expert_options(args),
        args.prompt_len,
        args.new_tokens,
        None if args.baseline == "none" else args.baseline_tokens,
        partial=lambda doc: write_document(doc, out) if (out := args.out) else None,
    )
    _write_result(doc, args.out, doc["entries"][0]["config"]["name"])
    return 0


def cmd_bench_dims(args: argparse.Namespace) -> int:
    from onebox.bench.dims import run_dims
    from onebox.device import pick_device

    try:
        start, stop, step = (int(v) for v in args.dims.split(":"))
        dims = list(range(start, stop + 1, step))
    except ValueError:
        raise OneboxError(f"--dims expects START:STOP:STEP (e.g. 1024:8192:256), got {args.dims!r}.") from None
    if not dims or any(d % 128 for d in dims):
        raise OneboxError("--dims must give at least one width, each a multiple of 128 (head size 128).")
    doc = run_dims(
        dims,
        pick_device(args.device),
        args.precision,
        say,
        batch=args.batch,
        seq=args.seq,
        repeats=args.repeats,
        iters=args.iters,
    )
    _write_result(doc, args.out, f"{dims[0]}-{dims[-1]}")
    return 0


def add_bench_parsers(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure this machine: validate, sweep, forward, dims").add_subparsers(
        dest="bench", required=True
    )

    def common(p: argparse.ArgumentParser, training: bool) -> None:
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        if training:
            p.add_argument(
                "--precision",
                default="auto",
                choices=PRECISIONS,
                help="auto (bf16 on CUDA, fp32 elsewhere), bf16, fp32, or fp8: "
                "the blocks' products in float8 through torchao (the baseline stays bf16)",
            )
        else:
            p.add_argument(
                "--precision",
                default="auto",
                choices=["auto", "bf16", "fp32"],
                help="auto (bf16 on CUDA, fp32 elsewhere), bf16 or fp32",
            )
        p.add_argument("--out", help="result JSON path (default results/<benchmark>-<label>-<device>-<time>.json)")
        if training:
            p.add_argument(
                "--steps", type=int, default=10, help="untimed training steps on the fixed batch (default 10)"
            )
            p.add_argument("--timed-steps", type=int, default=10, help="timed steps after them (default 10)")
            p.add_argument(
                "--compile",
                default="auto",
                choices=COMPILE_SETTINGS,
                help="as train's --compile (default auto: on for CUDA)",
            )
            p.add_argument(
                "--memory",
                default="auto",
                choices=MEMORY_SETTINGS,
                help="memory strategy (default: the planner's choice, as in training; see onebox plan)",
            )
            p.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
            p.add_argument(
                "--baseline",
                choices=["hf", "hf-compile"],
                help="also run transformers' model of the same family in the same process",
            )

    p = bench.add_parser("validate", help="time training steps of one preset on fixed synthetic tokens")
    p.add_argument("--preset", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--gpus",
        type=int,
        help="also measure on this many processes (torchrun + FSDP2, --batch each) and the scaling against one",
    )
    common(p, training=True)
    for item in fields(ModelConfig):  # shape overrides, e.g. --seq-len 1024
        p.add_argument(
            f"--{item.name.replace('_', '-')}",
            dest=f"model.{item.name}",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    p.set_defaults(func=cmd_bench_validate)

    p = bench.add_parser("sweep", help="the 25-configuration width/depth sweep (five variants per scale)")
    p.add_argument("--scales", default="600m,1b,1.5b,3b,5b")
    p.add_argument("--batch", type=int, help="micro-batch for every scale (default: 32, 16, 12, 8, 4 by scale)")
    common(p, training=True)
    p.set_defaults(func=cmd_bench_sweep)

    p = bench.add_parser("forward", help="forward-only ladder; rungs past GPU memory stream blocks from host memory")
    p.add_argument("--ladder", help="comma-separated presets (default 5b,7b,10b,13b,15b,20b,25b,30b,40b,50b)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--passes", type=int, default=3)
    common(p, training=False)
    p.set_defaults(func=cmd_bench_forward)

    p = bench.add_parser(
        "ceiling", help="the largest model this machine trains: rung by rung, each with its planned memory strategy"
    )
    p.add_argument(
        "--ladder",
        help="comma-separated presets (default 5b,7b,10b,13b,15b,20b,25b,30b; with --gpus on to 40b,50b,60b)",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="training steps per rung on one fixed batch (default 10)")
    p.add_argument(
        "--memory",
        default="auto",
        choices=MEMORY_SETTINGS,
        help="memory strategy for every rung (default: planned per rung; see onebox plan)",
    )
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--gpus", type=int, help="train each rung on this many processes (torchrun + FSDP2, --batch each)")
    p.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GB",
        help="plan and train within this many GB of each GPU (a smaller card's ceiling, "
        "e.g. 80 on a 141 GB H200); memory outside PyTorch's allocator is not counted",
    )
    p.add_argument("--out", help="result JSON path (default results/ceiling-ladder-<device>-<time>.json)")
    p.set_defaults(func=cmd_bench_ceiling)

    def model_source(p: argparse.ArgumentParser) -> None:  # what decode and serve run on (see _inference_model)
        p.add_argument("--preset", help="random weights of this preset")
        p.add_argument("--model", help="a checkpoint, run folder or Hugging Face folder")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.add_argument("--out", help="result JSON path")

    p = bench.add_parser(
        "decode", help="prefill and decode tokens/s against the memory-bandwidth bound, beside transformers"
    )
    model_source(p)
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--baseline",
        choices=["hf"],
        help="also time transformers' generate() on the same weights, with its default and its static (compiled) cache",
    )
    p.add_argument(
        "--kernels",
        default="auto",
        help="onebox's decode kernels: auto (gemv,attention,rope on CUDA; pdl,chain on Hopper), none "
        "(cuBLAS and SDPA), or a comma list of gemv, attention, rope, pdl, chain",
    )
    p.set_defaults(func=cmd_bench_decode)

    p = bench.add_parser(
        "moe", help="a mixture of experts within GPU and host budgets: decode, hit rate, bytes a token, the copy floor"
    )
    p.add_argument("--preset", help="random weights of this MoE preset (written once as a Hugging Face folder)")
    p.add_argument("--model", help="a Hugging Face folder of a mixture of experts")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", help="result JSON path")
    add_expert_flags(p)
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per request (default 64)")
    p.add_argument(
        "--baseline",
        choices=["hf-accelerate", "none"],
        default="hf-accelerate",
        help="transformers + accelerate offload under the same budgets at batch 1 (default), or none",
    )
    p.add_argument("--baseline-tokens", type=int, default=16, help="tokens the baseline decodes (default 16)")
    p.add_argument("--work-dir", help="where a preset's folder is written (default: the temp folder)")
    p.set_defaults(func=cmd_bench_moe)

    p = bench.add_parser(
        "serve", help="concurrent streaming clients against a live server: latency percentiles and aggregate tokens/s"
    )
    model_source(p)
    p.add_argument("--clients", default="1,8,32", help="client counts (default 1,8,32)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.set_defaults(func=cmd_bench_serve)

    p = bench.add_parser("dims", help="time per FLOP of one layer across widths, and the cliffs")
    p.add_argument("--dims", default="1024:8192:256", help="START:STOP:STEP (default 1024:8192:256)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    common(p, training=False)
    p.set_defaults(func=cmd_bench_dims)
