"""The `onebox` command: parses arguments, calls one function, formats errors. No logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rich.table import Table

from onebox import __version__
from onebox.cli.bench import add_bench_parsers, add_plan_parser
from onebox.cli.common import add_config_fields, console, errors, overrides
from onebox.config import PRESETS
from onebox.errors import OneboxError


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
    model_overrides, train_overrides = overrides(args, "model"), overrides(args, "train")
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
    from onebox.checkpoint import load_checkpoint, model_state
    from onebox.config import model_config_from_dict
    from onebox.export import export_hf

    payload = load_checkpoint(args.checkpoint)
    out = export_hf(model_state(payload), model_config_from_dict(payload["model_config"]), payload.get("tokenizer_json"), args.out_dir, args.dtype)
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
    add_config_fields(p)
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

    add_plan_parser(sub)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)
    add_bench_parsers(sub)
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
