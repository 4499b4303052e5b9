"""The `onebox` command: parses arguments, calls one function, formats errors. No logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from onebox import __version__
from onebox.cli.bench import add_bench_parsers
from onebox.cli.chat import (
    CONTEXT_HELP,
    add_chat_parser,
    add_expert_flags,
    add_sampling_flags,
    expert_options,
    sampling,
)
from onebox.cli.common import (
    DEVICE_HELP,
    add_config_fields,
    console,
    errors,
    mark_subcommands,
    overrides,
    plural,
    refuse_unknown,
)
from onebox.cli.evaluate import add_eval_parser
from onebox.cli.plan import add_plan_parser
from onebox.cli.results import add_results_parsers
from onebox.errors import OneboxError
from onebox.presets import PRESETS


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
        force=args.force,
        fmt=args.format,
    )
    if args.format != "text":
        console.print(
            f"wrote {meta['train_examples']:,} training and {meta['val_examples']:,} held-out examples to {args.out}"
        )
        return 0
    console.print(
        f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
        f"({plural(meta['documents'], 'document')}, {meta['val_documents']} held out; vocab {meta['vocab_size']}) to {args.out}",
        highlight=False,
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from onebox.config import config_dict
    from onebox.presets import resolve_configs
    from onebox.training import resume_configs, train

    if args.gpus is not None:
        from onebox.launch import launch

        return launch(args.gpus, args.argv)
    model_overrides, train_overrides = overrides(args, "model"), overrides(args, "train")
    resume = None
    if args.resume is not None:
        if model_overrides:
            raise OneboxError(
                f"--resume continues a run with its own model; drop the model flags {sorted(model_overrides)}."
            )
        target = args.resume
        if not target:  # bare --resume: the run folder this configuration would write to
            model_cfg, train_cfg = resolve_configs(args.preset, args.config, {}, train_overrides)
            target = train_cfg.out_dir or f"runs/{model_cfg.name}"
        model_cfg, train_cfg, resume_path = resume_configs(target, train_overrides)
        asked, asked_train = resolve_configs(args.preset, args.config, {}, {})
        if (args.preset or args.config) and not asked_train.init_from:  # (a model from --init-from is the run's own)
            if config_dict(asked) | {"name": ""} != config_dict(model_cfg) | {"name": ""}:
                raise OneboxError(
                    f"--resume continues {resume_path}, a {model_cfg.name} model ({model_cfg.shape()}), but "
                    f"{'--preset ' + args.preset if args.preset else '--config ' + args.config} gives {asked.name} ({asked.shape()}): "
                    "drop it to continue the run, or leave out --resume to start a new one."
                )
        resume = str(resume_path)
    else:
        model_cfg, train_cfg = resolve_configs(args.preset, args.config, model_overrides, train_overrides)
    result = train(model_cfg, train_cfg, resume=resume, console=console, show_progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # one summary for a multi-process job
        console.print(
            f"done: step {result.step} | train loss {_number(result.train_loss, '.4f')} | val loss {_number(result.val_loss, '.4f')} | "
            f"val bits/byte {_number(result.val_bpb, '.3f')} | checkpoint {result.checkpoint}",
            highlight=False,
        )
    return 0


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def cmd_export(args: argparse.Namespace) -> int:
    from onebox.checkpoint import load_checkpoint
    from onebox.config import model_config_from_dict
    from onebox.export import export_adapter, export_hf
    from onebox.training.start import checkpoint_state, lora_model

    payload = load_checkpoint(args.checkpoint)
    if args.adapter:
        if not payload.get("lora"):
            raise OneboxError(
                f"{payload['path']} is not a LoRA run's checkpoint: --adapter exports adapters; leave it out."
            )
        model, spec = lora_model(payload)
        base = payload["train_config"]["init_from"]
        out = export_adapter(model, spec, base, args.out_dir, args.force, Path(payload["path"]).parent)
        console.print(
            f"exported the LoRA adapters of {payload['path']} (step {payload['step']}) to {out} (PEFT format)"
        )
        return 0
    out = export_hf(
        checkpoint_state(payload),
        model_config_from_dict(payload["model_config"]),
        payload.get("tokenizer_json"),
        args.out_dir,
        args.dtype,
        force=args.force,
        run_dir=Path(payload["path"]).parent,
    )
    console.print(
        f"exported {payload['path']} (step {payload['step']}) to {out} as a Hugging Face {payload['model_config'].get('family', 'llama')} folder",
        highlight=False,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from onebox.device import pick_device
    from onebox.infer.framing import load_framing
    from onebox.infer.generate import generate, load_model

    flags = sampling(args)
    if args.samples < 1:
        raise OneboxError(f"--samples must be at least 1, got {args.samples}.")
    model, tokenizer = load_model(
        args.model, pick_device(args.device), context=args.context, batch=args.samples, **expert_options(args)
    )
    framing = load_framing(args.model, tokenizer)
    if args.jsonl:
        return _generate_jsonl(args, model, tokenizer, framing)
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    elif args.chat:
        prompt = framing.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = framing.encode(args.prompt)
    result = generate(model, prompt, args.max_new_tokens, **flags, samples=args.samples, stop_ids=framing.stops)
    for index, sample in enumerate(result.samples):
        if args.samples > 1:
            console.print(f"--- sample {index + 1}", style="bold")
        reply = framing.decode(sample) if tokenizer else " ".join(map(str, sample))
        text = reply if args.chat else (args.prompt or "") + reply
        console.print(text, highlight=False, markup=False)
    speed = result.decode_tokens_per_second
    errors.print(
        f"prefill {result.prefill_seconds * 1000:.0f} ms ({len(prompt)} tokens) | decode {result.decode_seconds * 1000:.0f} ms "
        f"({'n/a' if speed is None else f'{speed:,.0f}'} tok/s)",
        highlight=False,
    )
    return 0


def _generate_jsonl(args: argparse.Namespace, model: Any, tokenizer: Any, framing: Any) -> int:
    from onebox.infer.engine import Engine
    from onebox.serve import Server, run_jsonl

    engine = Engine(model, max_batch=8).start()
    try:
        failed = run_jsonl(
            Server(engine, tokenizer, "onebox", max_n=8, framing=framing),
            sys.stdin,
            lambda text: print(text, flush=True),
        )
    finally:
        engine.stop()
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from onebox.serve import run_server
    except ImportError:
        raise OneboxError(
            "onebox serve needs FastAPI and uvicorn, which onebox declares: reinstall onebox (pip install -e .) or pip install fastapi uvicorn."
        ) from None
    for flag, value in (("--max-batch", args.max_batch), ("--max-n", args.max_n), ("--max-queue", args.max_queue)):
        if value < 1:
            raise OneboxError(f"{flag} must be at least 1, got {value}.")
    if args.max_body_mb <= 0:
        raise OneboxError(f"--max-body-mb must be more than 0, got {args.max_body_mb:g}.")
    run_server(
        args.model,
        args.host,
        args.port,
        args.model_name,
        args.device,
        args.max_batch,
        args.max_n,
        args.max_queue,
        int(args.max_body_mb * 2**20),
        args.context,
        expert_options(args),
    )
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    table = Table("preset", "shape", "heads/kv", "params", "GFLOP/token")
    for name, cfg in PRESETS.items():
        table.add_row(
            name,
            cfg.shape(),
            f"{cfg.heads}/{cfg.kv_heads}",
            f"{cfg.num_params() / 1e6:,.1f}M",
            f"{cfg.flops_per_token() / 1e9:.2f}",
        )
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="onebox", description="Train, benchmark and serve LLaMA-style models on one machine."
    )
    parser.add_argument("--version", action="version", version=f"onebox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize text files, folders or .jsonl into token shards")
    p.add_argument("inputs", nargs="+", help="text files, folders of them, or .jsonl files with a 'text' field")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vocab-size", type=int, default=8192, help="entries of the byte-level BPE to train (default 8192)")
    p.add_argument("--tokenizer", help="use this tokenizer.json (or a model folder's) instead of training one")
    p.add_argument(
        "--format",
        choices=["text", "chat", "instruction", "preference"],
        default="text",
        help="text (default), or JSONL conversations rendered with --tokenizer's chat template, the loss on the "
        "assistant's tokens only: chat (messages), instruction (instruction/output) or preference (prompt/chosen/rejected, for DPO)",
    )
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of whole documents held out (default 0.05)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default 1e8)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the data an earlier prepare wrote to --out (other files there stay)",
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model from scratch, from a HF folder, or resume a run")
    p.add_argument("--preset", metavar="NAME", help="model preset (default tiny; `onebox presets` lists them)")
    p.add_argument("--config", help="TOML job file with preset, [model] and [train] tables")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CKPT_OR_RUN_DIR",
        help="continue a run exactly (default: the run's latest checkpoint)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "--gpus",
        type=int,
        help="launch this many processes with torchrun (one per GPU; gloo processes with --device cpu)",
    )
    p.epilog = "Model fields default to the preset's (tiny unless --preset or --config says otherwise); train fields to the values shown."
    add_config_fields(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export",
        help="write a Hugging Face folder (SafeTensors; the model's family: llama, mistral, qwen2 or qwen3) from a checkpoint",
    )
    p.add_argument("checkpoint", help="a ckpt_*.pt file or a run folder (its latest checkpoint)")
    p.add_argument("out_dir", help="a new or empty folder (an earlier export is replaced only with --force)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype (default float32)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export's files in out_dir (nothing else there is touched)",
    )
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run: write its adapters as a PEFT folder (default: the model with the adapters merged in)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample text from a checkpoint, run folder or HF folder")
    p.add_argument("model", help="checkpoint file, run folder or Hugging Face folder")
    p.add_argument("--prompt", default="", help="prompt text")
    p.add_argument("--prompt-ids", help="prompt as comma-separated token ids (instead of text)")
    p.add_argument(
        "--chat", action="store_true", help="the prompt is a user message, written with the model's chat template"
    )
    add_sampling_flags(p)
    p.add_argument("--context", type=int, help=CONTEXT_HELP)
    add_expert_flags(p)
    p.add_argument("--samples", type=int, default=1, help="continuations sharing one prefill (default 1)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--jsonl", action="store_true", help="read one JSON request per stdin line, write one JSON response per line"
    )
    p.set_defaults(func=cmd_generate)

    add_chat_parser(sub)
    add_eval_parser(sub)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)")
    p.add_argument("model", help="checkpoint file, run folder or Hugging Face folder")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--context", type=int, help=CONTEXT_HELP + "; the KV cache holds max-batch x context tokens")
    add_expert_flags(p)
    p.add_argument("--max-n", type=int, default=8, help="largest n a request may ask for (default 8)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait for a slot; more are answered 429 (default 64)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=8.0,
        help="largest request body in MiB; larger ones are answered 413 (default 8)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_serve)

    add_plan_parser(sub)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)
    add_bench_parsers(sub)
    add_results_parsers(sub)
    mark_subcommands(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one subcommand; problems end as one short message and a non-zero exit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        refuse_unknown(args.subcommand_parser, unknown)
    args.argv = argv
    import torch

    from onebox.training import Interrupted

    try:
        return args.func(args)
    except Interrupted as err:
        errors.print(f"[yellow]{err}[/yellow]", highlight=False)
        return 130
    except OneboxError as err:
        rank = (
            f" (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']})"
            if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1"
            else ""
        )
        errors.print(f"[bold red]error{rank}:[/bold red] {err}", highlight=False)
        return 1
    except torch.cuda.OutOfMemoryError:
        errors.print(
            "[bold red]error:[/bold red] out of GPU memory. Use a smaller --batch-size (with --grad-accum to keep the "
            "tokens per step), --activation-checkpointing true, or a smaller preset.",
            highlight=False,
        )
        return 1
    except KeyboardInterrupt:
        errors.print("interrupted.", highlight=False)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
