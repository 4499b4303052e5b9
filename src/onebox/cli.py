"""The `onebox` command: parses arguments, calls one function, formats errors. No logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Any

from rich.console import Console
from rich.table import Table

from onebox import __version__
from onebox.config import (
    COMPILE_SETTINGS,
    PRECISIONS,
    PRESETS,
    ModelConfig,
    TrainConfig,
)
from onebox.errors import OneboxError

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def _add_config_fields(parser: argparse.ArgumentParser) -> None:
    """One --flag per ModelConfig and TrainConfig field, overriding the preset / TOML value by name."""
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        group = parser.add_argument_group(f"{section} fields (override the preset and --config)")
        for item in fields(cls):
            default = item.default
            group.add_argument(
                f"--{item.name.replace('_', '-')}",
                dest=f"{section}.{item.name}",
                default=argparse.SUPPRESS,
                metavar=type(default).__name__.upper(),
                help=f"default {default!r}" if default != "" else None,
            )


def _overrides(args: argparse.Namespace, section: str) -> dict[str, Any]:
    prefix = f"{section}."
    return {key[len(prefix):]: value for key, value in vars(args).items() if key.startswith(prefix)}


def cmd_prepare(args: argparse.Namespace) -> int:
    from onebox.data import prepare

    meta = prepare(
        args.inputs,
        args.out,
        vocab_size=args.vocab_size,
        tokenizer_path=args.tokenizer,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        progress=lambda message: console.print(message, highlight=False),
    )
    console.print(
        f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
        f"({meta['documents']} documents, {meta['val_documents']} held out; vocab {meta['vocab_size']}) to {args.out}",
        highlight=False,
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from onebox.config import resolve_configs
    from onebox.train import resume_configs, train

    if args.gpus is not None and "WORLD_SIZE" not in os.environ:
        from onebox.launch import launch

        return launch(args.gpus, args.argv)
    model_overrides, train_overrides = _overrides(args, "model"), _overrides(args, "train")
    resume = None
    if args.resume is not None:
        if model_overrides:
            raise OneboxError(f"--resume continues a run with its own model; drop the model flags {sorted(model_overrides)}.")
        target = args.resume
        if not target:  # bare --resume: the run folder this configuration would write to
            model_cfg, train_cfg = resolve_configs(args.preset, args.config, {}, train_overrides)
            target = train_cfg.out_dir or f"runs/{model_cfg.name}"
        model_cfg, train_cfg, resume_path = resume_configs(target, train_overrides)
        resume = str(resume_path)
    else:
        model_cfg, train_cfg = resolve_configs(args.preset, args.config, model_overrides, train_overrides)
    result = train(model_cfg, train_cfg, resume=resume, console=console, show_progress=not args.quiet)
    bpb = "n/a" if result.val_bpb is None else f"{result.val_bpb:.3f}"
    val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
    if os.environ.get("RANK", "0") == "0":  # one summary for a multi-process job
        console.print(f"done: step {result.step} | train loss {result.train_loss:.4f} | val loss {val} | val bits/byte {bpb} | checkpoint {result.checkpoint}",
                      highlight=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from onebox.checkpoint import load_checkpoint
    from onebox.config import model_config_from_dict
    from onebox.export import export_hf

    payload = load_checkpoint(args.checkpoint)
    out = export_hf(payload["model"], model_config_from_dict(payload["model_config"]), payload.get("tokenizer_json"), args.out_dir, args.dtype)
    console.print(f"exported {payload['path']} (step {payload['step']}) to {out} as a Hugging Face Llama folder", highlight=False)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from onebox.device import pick_device
    from onebox.infer.generate import encode_prompt, generate, load_model
    from onebox.tokenizer import eos_id

    model, tokenizer = load_model(args.model, pick_device(args.device))
    if args.jsonl:
        return _generate_jsonl(args, model, tokenizer)
    ids = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    prompt = encode_prompt(tokenizer, args.prompt, ids)
    result = generate(
        model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.samples,
        stop_id=eos_id(tokenizer) if tokenizer else None,
    )
    for index, sample in enumerate(result.samples):
        if args.samples > 1:
            console.print(f"--- sample {index + 1}", style="bold")
        text = (args.prompt or "") + tokenizer.decode(sample) if tokenizer else " ".join(map(str, sample))
        console.print(text, highlight=False, markup=False)
    speed = result.decode_tokens_per_second
    errors.print(f"prefill {result.prefill_seconds * 1000:.0f} ms ({len(prompt)} tokens) | decode {result.decode_seconds * 1000:.0f} ms "
                 f"({'n/a' if speed is None else f'{speed:,.0f}'} tok/s)", highlight=False)
    return 0


def _generate_jsonl(args: argparse.Namespace, model: Any, tokenizer: Any) -> int:
    from onebox.infer.engine import Engine
    from onebox.serve import Server, run_jsonl

    engine = Engine(model, max_batch=8).start()
    try:
        failed = run_jsonl(Server(engine, tokenizer, "onebox", max_n=8), sys.stdin, lambda text: print(text, flush=True))
    finally:
        engine.stop()
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from onebox.serve import run_server
    except ImportError:
        raise OneboxError("onebox serve needs FastAPI and uvicorn, which onebox declares: reinstall onebox (pip install -e .) or pip install fastapi uvicorn.") from None
    run_server(args.model, args.host, args.port, args.model_name, args.device, args.max_batch, args.max_n)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    table = Table("preset", "shape", "heads/kv", "params", "GFLOP/token")
    for name, cfg in PRESETS.items():
        table.add_row(name, cfg.shape(), f"{cfg.heads}/{cfg.kv_heads}", f"{cfg.num_params() / 1e6:,.1f}M", f"{cfg.flops_per_token() / 1e9:.2f}")
    console.print(table)
    return 0


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
        errors.print("[yellow]this result would be rejected by `onebox results add`:[/yellow] " + "; ".join(problems), highlight=False)


def _bench_settings(args: argparse.Namespace, batch: int):
    from onebox.bench.training import BenchSettings

    return BenchSettings(batch=batch, steps=args.steps, timed_steps=args.timed_steps, precision=args.precision, compile=args.compile, lr=args.lr,
                         memory=args.memory).validate()


def _say(message: str) -> None:
    console.print(message, highlight=False)


def cmd_bench_validate(args: argparse.Namespace) -> int:
    from onebox.bench.validate import run_validate
    from onebox.config import apply_overrides, preset
    from onebox.device import pick_device

    config = apply_overrides(preset(args.preset), _overrides(args, "model")).validate()
    if os.environ.get("WORLD_SIZE", "1") != "1" and "ONEBOX_SCALING_OUT" in os.environ:  # a process of --gpus N
        from onebox.bench.validate import run_scaling_worker

        return run_scaling_worker(config, args.device, _bench_settings(args, args.batch), os.environ["ONEBOX_SCALING_OUT"])
    doc = run_validate(config, pick_device(args.device), _bench_settings(args, args.batch), args.baseline, _say)
    if args.gpus is not None and args.gpus > 1:
        from onebox.bench.validate import add_scaling

        add_scaling(doc, args.gpus, args.argv, _say)
    _write_result(doc, args.out, config.name)
    return 0 if doc["entries"][0]["result"]["status"] == "ok" else 1


def cmd_bench_sweep(args: argparse.Namespace) -> int:
    from onebox.bench.validate import run_sweep
    from onebox.device import pick_device

    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    doc = run_sweep(scales, pick_device(args.device), _bench_settings(args, args.batch or 1), args.baseline, _say, batch=args.batch)
    _write_result(doc, args.out, "-".join(scales))
    return 0


def cmd_bench_forward(args: argparse.Namespace) -> int:
    from onebox.bench.forward import run_forward
    from onebox.device import pick_device

    ladder = [s.strip() for s in args.ladder.split(",")] if args.ladder else None
    doc = run_forward(ladder, pick_device(args.device), args.precision, _say, batch=args.batch, passes=args.passes)
    _write_result(doc, args.out, "ladder")
    return 0


def cmd_bench_ceiling(args: argparse.Namespace) -> int:
    from onebox.bench.ceiling import run_ceiling
    from onebox.device import pick_device

    if args.steps < 2 or args.batch < 1:
        raise OneboxError("bench ceiling needs --steps >= 2 (the loss must be seen to fall) and --batch >= 1.")
    ladder = [s.strip() for s in args.ladder.split(",")] if args.ladder else None
    doc = run_ceiling(ladder, pick_device(args.device), _say, batch=args.batch, steps=args.steps, memory=args.memory, lr=args.lr)
    _write_result(doc, args.out, "ladder")
    return 0


def _inference_model(args: argparse.Namespace, what: str) -> Any:
    """The model a decode or serve benchmark runs: a preset's random weights or a saved model, bf16 on CUDA."""
    import torch

    from onebox.config import preset
    from onebox.device import pick_device
    from onebox.infer.generate import load_model
    from onebox.model import build_model

    if bool(args.preset) == bool(args.model):
        raise OneboxError(f"bench {what} needs exactly one of --preset NAME (random weights) or --model PATH (a checkpoint, run or HF folder).")
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.preset:
        return build_model(preset(args.preset), device, dtype).eval()
    model = load_model(args.model, device)[0].to(dtype)
    model.reset_rope()
    return model


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
    doc = run_serve_bench(model, _say, clients, args.max_tokens, args.prompt_len)
    _write_result(doc, args.out, model.config.name)
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from onebox.bench.decode import run_decode

    batches = _int_list(args.batches, "--batches")
    model = _inference_model(args, "decode")
    doc = run_decode(model, model.embed_tokens.weight.device, _say, batches, args.prompt_len, args.new_tokens, baseline=args.baseline == "hf")
    _write_result(doc, args.out, model.config.name)
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
    doc = run_dims(dims, pick_device(args.device), args.precision, _say, batch=args.batch, seq=args.seq, repeats=args.repeats, iters=args.iters)
    _write_result(doc, args.out, f"{dims[0]}-{dims[-1]}")
    return 0


def cmd_results_add(args: argparse.Namespace) -> int:
    from onebox.bench.store import ResultStore

    store = ResultStore(args.db)
    failed = 0
    for path in args.files:
        try:
            added = store.add_file(path)
            console.print(f"{'added' if added else 'already stored'}: {path}", highlight=False)
        except OneboxError as err:
            errors.print(f"[bold red]rejected:[/bold red] {err}", highlight=False)
            failed += 1
    store.close()
    return 1 if failed else 0


def cmd_results_list(args: argparse.Namespace) -> int:
    from onebox.bench.store import ResultStore
    from onebox.device import format_bytes

    store = ResultStore(args.db)
    table = Table("device", "config", "params", "tok/s", "MFU", "peak memory", "tok/J")
    for device, name, params, tps, mfu, memory, tpj in store.leaderboard():
        table.add_row(device, name, f"{params / 1e6:,.0f}M", f"{tps:,.0f}", "n/a" if mfu is None else f"{mfu:.1%}", format_bytes(memory),
                      "n/a" if tpj is None else f"{tpj:,.0f}")
    console.print(table)
    store.close()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from onebox.bench.report import build_report
    from onebox.bench.schema import check_document, read_document
    from onebox.bench.store import ResultStore

    if args.files:
        docs = [read_document(path) for path in args.files]
        for path, doc in zip(args.files, docs):
            check_document(doc, path)
    else:
        store = ResultStore(args.db)
        docs = store.documents()
        store.close()
    if not docs:
        raise OneboxError("no result documents to report: give JSON files or add some with `onebox results add`.")
    md, page = build_report(docs, args.out)
    console.print(f"wrote {md} and {page}", highlight=False)
    return 0


def _add_bench_parsers(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure this machine: validate, sweep, forward, dims").add_subparsers(dest="bench", required=True)

    def common(p: argparse.ArgumentParser, training: bool) -> None:
        p.add_argument("--device", default="auto")
        p.add_argument("--precision", default="auto", choices=PRECISIONS if training else ["auto", "bf16", "fp32"],
                       help="fp8: the blocks' products in float8 through torchao (training benchmarks; the baseline stays bf16)")
        p.add_argument("--out", help="result JSON path (default results/<benchmark>-<label>-<device>-<time>.json)")
        if training:
            p.add_argument("--steps", type=int, default=10, help="untimed training steps on the fixed batch (default 10)")
            p.add_argument("--timed-steps", type=int, default=10, help="timed steps after them (default 10)")
            p.add_argument("--compile", default="auto", choices=COMPILE_SETTINGS)
            p.add_argument("--memory", default="auto", help="memory strategy (default: the planner's choice, as in training; see onebox plan)")
            p.add_argument("--lr", type=float, default=3e-4)
            p.add_argument("--baseline", choices=["hf", "hf-compile"], help="also run transformers' Llama in the same process")

    p = bench.add_parser("validate", help="time training steps of one preset on fixed synthetic tokens")
    p.add_argument("--preset", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gpus", type=int, help="also measure on this many processes (torchrun + FSDP2, --batch each) and the scaling against one")
    common(p, training=True)
    for item in fields(ModelConfig):  # shape overrides, e.g. --seq-len 1024
        p.add_argument(f"--{item.name.replace('_', '-')}", dest=f"model.{item.name}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
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

    p = bench.add_parser("ceiling", help="the largest model this machine trains: rung by rung, each with its planned memory strategy")
    p.add_argument("--ladder", help="comma-separated presets (default 5b,7b,10b,13b,15b,20b,25b,30b)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="training steps per rung on one fixed batch (default 10)")
    p.add_argument("--memory", default="auto", help="memory strategy for every rung (default: planned per rung; see onebox plan)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="result JSON path (default results/ceiling-ladder-<device>-<time>.json)")
    p.set_defaults(func=cmd_bench_ceiling)

    p = bench.add_parser("decode", help="prefill and decode tokens/s against the memory-bandwidth bound, beside transformers")
    p.add_argument("--preset", help="random weights of this preset")
    p.add_argument("--model", help="a checkpoint, run folder or Hugging Face folder")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--baseline", choices=["hf"], help="also time transformers' generate() on the same weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="result JSON path")
    p.set_defaults(func=cmd_bench_decode)

    p = bench.add_parser("serve", help="concurrent streaming clients against a live server: latency percentiles and aggregate tokens/s")
    p.add_argument("--preset", help="random weights of this preset")
    p.add_argument("--model", help="a checkpoint, run folder or Hugging Face folder")
    p.add_argument("--clients", default="1,8,32", help="client counts (default 1,8,32)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="result JSON path")
    p.set_defaults(func=cmd_bench_serve)

    p = bench.add_parser("dims", help="time per FLOP of one layer across widths, and the cliffs")
    p.add_argument("--dims", default="1024:8192:256", help="START:STOP:STEP (default 1024:8192:256)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    common(p, training=False)
    p.set_defaults(func=cmd_bench_dims)

    results = sub.add_parser("results", help="the local leaderboard").add_subparsers(dest="results", required=True)
    p = results.add_parser("add", help="validate result documents and store them")
    p.add_argument("files", nargs="+")
    p.add_argument("--db", default="results/leaderboard.sqlite")
    p.set_defaults(func=cmd_results_add)
    p = results.add_parser("list", help="best stored run per device and configuration")
    p.add_argument("--db", default="results/leaderboard.sqlite")
    p.set_defaults(func=cmd_results_list)

    p = sub.add_parser("report", help="Markdown + self-contained HTML report with plots")
    p.add_argument("files", nargs="*", help="result documents (default: everything in --db)")
    p.add_argument("--db", default="results/leaderboard.sqlite")
    p.add_argument("--out", default="results/report")
    p.set_defaults(func=cmd_report)


def _plan_ladder(machine: Any, batch: int, on_gpu: bool) -> int:
    from onebox.config import LADDER, preset
    from onebox.plan import plan

    table = Table(title=f"training ceiling by the planner, batch {batch}, on {machine.label}")
    for column in ("rung", "params", "strategy", "GPU GB" if on_gpu else "RAM GB", "host GB"):
        table.add_column(column, justify="left" if column in ("rung", "strategy") else "right")
    ceiling = None
    for name in LADDER:
        config = preset(name)
        chosen, predictions = plan(config, batch, machine, compiled=on_gpu, mixed=on_gpu)
        shown = next((p for p in predictions if p.strategy == chosen), predictions[-1])
        table.add_row(name, f"{config.num_params() / 1e9:.1f}B", chosen.name if chosen else "does not fit", f"{shown.gpu / 1e9:.1f}", f"{shown.host / 1e9:.1f}")
        ceiling = name if chosen else ceiling
    console.print(table)
    console.print(f"predicted training ceiling: {ceiling or 'below the ladder (5b)'} (an estimate: `onebox bench ceiling` measures it)", highlight=False)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from onebox.config import apply_overrides, preset
    from onebox.device import pick_device
    from onebox.plan import (
        GPU_HEADROOM,
        HOST_HEADROOM,
        MachineMemory,
        fits,
        machine_memory,
        plan,
    )

    machine = machine_memory(pick_device(args.device))
    if args.gpu_memory is not None or args.host_memory is not None:
        gpu = machine.gpu if args.gpu_memory is None else int(args.gpu_memory * 1e9)
        host = machine.host if args.host_memory is None else int(args.host_memory * 1e9)
        machine = MachineMemory(gpu, host, f"{'no GPU' if gpu is None else f'{gpu / 1e9:.0f} GB GPU'}, {host / 1e9:.0f} GB host (as given)")
    on_gpu = machine.gpu is not None  # bf16 autocast and compiled blocks there, fp32 eager on the CPU
    if args.ladder:
        return _plan_ladder(machine, args.batch, on_gpu)
    if not args.preset:
        raise OneboxError("onebox plan needs --preset NAME (one model) or --ladder (the training ceiling of this machine).")
    config = preset(args.preset)
    if args.seq_len:
        config = apply_overrides(config, {"seq_len": args.seq_len})
    chosen, predictions = plan(config, args.batch, machine, compiled=on_gpu, optimizer=args.optimizer, grad_accum=args.grad_accum, mixed=on_gpu)
    gb = 1e9
    table = Table(title=f"{config.name}: {config.num_params() / 1e9:.2f}B params, batch {args.batch} x seq {config.seq_len} on {machine.label}")
    for column in ("strategy", "GPU GB" if on_gpu else "RAM GB", "weights", "optim", "activ", "grads", "host GB", "fits"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for p in predictions:
        table.add_row(p.strategy.name, f"{p.gpu / gb:.1f}", f"{p.weights / gb:.1f}", f"{p.optimizer / gb:.1f}", f"{p.activations / gb:.1f}",
                      f"{p.gradients / gb:.1f}", f"{p.host / gb:.1f}", "yes" if fits(p, machine) else "no")
    console.print(table)
    for p in predictions:
        console.print(f"  {p.strategy.name}: {p.strategy.summary}", highlight=False)
    limits = f"usable: {GPU_HEADROOM:.0%} of GPU memory, {HOST_HEADROOM:.0%} of host RAM"
    if chosen is None:
        console.print(f"nothing fits ({limits}): lower --batch or --seq-len, or choose a smaller preset.", highlight=False)
        return 1
    console.print(f"planned: [bold]{chosen.name}[/bold], the fastest strategy that fits ({limits}); `onebox train` uses it "
                  f"with --memory auto, or name one with --memory.", highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="onebox", description="Train, benchmark and serve LLaMA-style models on one machine.")
    parser.add_argument("--version", action="version", version=f"onebox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize text files, folders or .jsonl into token shards")
    p.add_argument("inputs", nargs="+", help="text files, folders of them, or .jsonl files with a 'text' field")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vocab-size", type=int, default=8192, help="entries of the byte-level BPE to train (default 8192)")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of whole documents held out (default 0.05)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default 1e8)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model from scratch, from a HF folder, or resume a run")
    p.add_argument("--preset", help=f"model preset (default tiny): {', '.join(PRESETS)}")
    p.add_argument("--config", help="TOML job file with preset, [model] and [train] tables")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT_OR_RUN_DIR", help="continue a run exactly (default: the run's latest checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--gpus", type=int, help="launch this many processes with torchrun (one per GPU; gloo processes with --device cpu)")
    _add_config_fields(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a Hugging Face Llama folder (SafeTensors) from a checkpoint")
    p.add_argument("checkpoint", help="a ckpt_*.pt file or a run folder (its latest checkpoint)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample text from a checkpoint, run folder or HF folder")
    p.add_argument("model", help="checkpoint file, run folder or Hugging Face folder")
    p.add_argument("--prompt", default="", help="prompt text")
    p.add_argument("--prompt-ids", help="prompt as comma-separated token ids (instead of text)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--samples", type=int, default=1, help="continuations sharing one prefill")
    p.add_argument("--device", default="auto")
    p.add_argument("--jsonl", action="store_true", help="read one JSON request per stdin line, write one JSON response per line")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)")
    p.add_argument("model", help="checkpoint file, run folder or Hugging Face folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-n", type=int, default=8, help="largest n a request may ask for (default 8)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("plan", help="predicted GPU and host memory of each training memory strategy, and the one training would use")
    p.add_argument("--preset", help="the model to plan for")
    p.add_argument("--ladder", action="store_true", help="plan every rung of the ladder (5b..30b): the predicted training ceiling")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq-len", type=int, help="override the preset's sequence length")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="plan for a GPU of this many GB instead of this machine's")
    p.add_argument("--host-memory", type=float, metavar="GB", help="plan for this much host RAM instead of this machine's")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)
    _add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one subcommand; problems end as one short message and a non-zero exit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    import torch

    from onebox.train import Interrupted

    try:
        return args.func(args)
    except Interrupted as err:
        errors.print(f"[yellow]{err}[/yellow]", highlight=False)
        return 130
    except OneboxError as err:
        rank = f" (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']})" if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
        errors.print(f"[bold red]error{rank}:[/bold red] {err}", highlight=False)
        return 1
    except torch.cuda.OutOfMemoryError:
        errors.print("[bold red]error:[/bold red] out of GPU memory. Use a smaller --batch-size (with --grad-accum to keep the "
                     "tokens per step), --activation-checkpointing true, or a smaller preset.", highlight=False)
        return 1
    except KeyboardInterrupt:
        errors.print("interrupted.", highlight=False)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
