"""What every onebox subcommand shares: the two consoles and the config-field flags."""

from __future__ import annotations

import argparse
import difflib
from dataclasses import fields
from typing import Any, NoReturn

from rich.console import Console

from onebox.config import COMPILE_SETTINGS, MEMORY_SETTINGS, OPTIMIZERS, PRECISIONS, ModelConfig, TrainConfig
from onebox.display import plural  # noqa: F401 (re-exported for the subcommands)

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def say(message: str) -> None:
    """Print one line of progress or result (no rich highlighting)."""
    console.print(message, highlight=False)


DEVICE_HELP = "auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps (default auto)"

# What the train fields mean, for --help (model fields are described by the presets).
FIELD_HELP = {
    "data": "folder of token shards from `onebox prepare` (default: the embedded Shakespeare corpus)",
    "out_dir": "run folder for checkpoints, config.json and metrics.jsonl (default runs/<model name>)",
    "init_from": "start from these weights: a Hugging Face folder, a onebox run folder or a checkpoint",
    "batch_size": "sequences per micro-batch, per process",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps of the whole run",
    "optimizer": "adamw, or muon (Muon on hidden matrices, AdamW on the rest)",
    "lr": "peak AdamW learning rate",
    "warmup_steps": "linear warm-up steps, then cosine decay to lr x min_lr_ratio at max_steps",
    "device": DEVICE_HELP,
    "precision": "auto (bf16 autocast on CUDA, fp32 elsewhere), bf16, fp8 (torchao float8 block products) or fp32",
    "compile": "auto (on for CUDA), on, off, block (each block) or model (the whole model)",
    "memory": "auto (the planner's choice, see `onebox plan`), standard, checkpointed, bf16, bf16-checkpointed, offload or offload-int8",
    "activation_checkpointing": "recompute each block's activations in backward (true/false)",
    "eval_every": "steps between validation passes (0 = only at the end)",
    "eval_batches": "validation batches per pass",
    "ckpt_every": "steps between checkpoints (0 = only at the end)",
    "keep_last": "checkpoints kept in the run folder",
    "log_every": "steps between progress lines",
    "grad_clip": "global gradient-norm clip (0 = off)",
    "lora_rank": "train LoRA adapters of this rank on the frozen --init-from model (0 = full fine-tuning)",
    "lora_alpha": "LoRA's alpha: the adapters' update is scaled by alpha / rank",
    "lora_dropout": "dropout on the adapters' input",
    "lora_targets": "the layers adapted, comma-separated among q, k, v, o, gate, up, down",
}
FIELD_CHOICES = {
    "optimizer": OPTIMIZERS,
    "precision": PRECISIONS,
    "compile": COMPILE_SETTINGS,
    "memory": MEMORY_SETTINGS,
}


def add_config_fields(parser: argparse.ArgumentParser) -> None:
    """One --flag per ModelConfig and TrainConfig field, overriding the preset / TOML value by name."""
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        title = (
            "model fields (default: the preset's)"
            if section == "model"
            else "train fields (override --config; defaults as shown)"
        )
        group = parser.add_argument_group(title)
        for item in fields(cls):
            default = item.default
            described = FIELD_HELP.get(item.name) if section == "train" else None
            shown = "" if section == "model" or default == "" else f"default {default!r}"
            group.add_argument(
                f"--{item.name.replace('_', '-')}",
                dest=f"{section}.{item.name}",
                default=argparse.SUPPRESS,
                choices=FIELD_CHOICES.get(item.name) if section == "train" else None,
                metavar=None if section == "train" and item.name in FIELD_CHOICES else type(default).__name__.upper(),
                help="; ".join(part for part in (described, shown) if part) or None,
            )


def mark_subcommands(parser: argparse.ArgumentParser) -> None:
    """Let every (sub)subcommand's parser record itself in the parsed namespace, so an error names the right one."""
    parser.set_defaults(subcommand_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                mark_subcommands(child)


def refuse_unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> NoReturn:
    """Exit with the subcommand's own usage, naming each unknown argument and the option it may be a typo of."""
    options = [option for action in parser._actions for option in action.option_strings]
    named = []
    for item in unknown:
        close = difflib.get_close_matches(item.split("=")[0], options, n=1) if item.startswith("-") else []
        named.append(f"{item} (did you mean {close[0]}?)" if close else item)
    parser.error(f"unrecognized arguments: {' '.join(named)}")


def overrides(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The config fields given on the command line for one section ('model' or 'train')."""
    prefix = f"{section}."
    return {key[len(prefix) :]: value for key, value in vars(args).items() if key.startswith(prefix)}
