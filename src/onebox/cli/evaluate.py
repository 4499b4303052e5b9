"""`onebox eval`: loss, perplexity and bits per byte of a model on held-out shards (training.evaluation)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from onebox.cli.common import DEVICE_HELP, say


def cmd_eval(args: argparse.Namespace) -> int:
    from onebox.device import pick_device
    from onebox.files import write_text_atomic
    from onebox.training.evaluation import evaluate_model

    result = evaluate_model(
        args.model, args.data, pick_device(args.device), args.batch, args.context, args.batches, say
    )
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=1))
    return 0


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a model on held-out token shards")
    p.add_argument("model", help="checkpoint file, run folder or Hugging Face folder")
    p.add_argument("--data", required=True, help="a folder from `onebox prepare`, tokenized with the model's tokenizer")
    p.add_argument("--batch", type=int, default=8, help="windows scored together (default 8)")
    p.add_argument("--context", type=int, help="tokens a window holds (default and most: the model's context)")
    p.add_argument("--batches", type=int, help="score at most this many batches (default: every window)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", help="also write the figures as JSON here")
    p.set_defaults(func=cmd_eval)
