"""What every onebox subcommand shares: the two consoles and the config-field flags."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from rich.console import Console

from onebox.config import ModelConfig, TrainConfig

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def say(message: str) -> None:
    """Print one line of progress or result (no rich highlighting)."""
    console.print(message, highlight=False)


def add_config_fields(parser: argparse.ArgumentParser) -> None:
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


def overrides(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The config fields given on the command line for one section ('model' or 'train')."""
    prefix = f"{section}."
    return {key[len(prefix):]: value for key, value in vars(args).items() if key.startswith(prefix)}
