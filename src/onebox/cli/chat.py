"""`onebox chat MODEL`: a multi-turn conversation in the terminal, streamed, with the model's own chat
template (infer.framing); `generate` and `serve` share its sampling flags and framing."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from onebox.cli.common import DEVICE_HELP, console, errors
from onebox.errors import OneboxError

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) ends it"


CONTEXT_HELP = (
    "the tokens the model runs at, prompt and completion (default: its own, at most 8192 for an imported model)"
)


def add_expert_flags(p: argparse.ArgumentParser) -> None:
    """--expert-slots, --gpu-memory and --host-memory: a mixture of experts beyond the device's memory."""
    p.add_argument(
        "--expert-slots",
        type=int,
        help="a mixture of experts: keep its experts in host memory and this many on the device at a time (an LRU cache)",
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        help="GB of the GPU to run within (a large card behaves like a smaller one); a mixture of experts keeps "
        "as many experts on it as fit",
    )
    p.add_argument(
        "--host-memory",
        type=float,
        help="GB of host memory for a mixture of experts' experts; past it they are read from the model's files",
    )
    p.add_argument(
        "--cold-experts",
        choices=["copy", "host", "auto"],
        default="copy",
        help="an expert not on the device: copy it there (default), compute it on the host's cores, or auto "
        "(whichever was measured faster at start, per number of tokens)",
    )


def expert_options(args: argparse.Namespace) -> dict[str, Any]:
    """The expert flags as load_model's keyword arguments (GB as bytes)."""
    gb = {
        name: None if getattr(args, name) is None else int(getattr(args, name) * 1e9)
        for name in ("gpu_memory", "host_memory")
    }
    return {"expert_slots": args.expert_slots, "cold_experts": args.cold_experts, **gb}


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int = 200) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"tokens to generate (default {max_new_tokens}; fewer where the context ends)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy, up to 2 (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens; 0 = off (default 200)")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: the likeliest tokens holding this much probability, in (0, 1] (default 1)",
    )
    p.add_argument("--seed", type=int, help="seed of the sampling (default: random)")


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags, checked as the server checks them, as generate()'s keyword arguments."""
    from onebox.infer.requests import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p, args.seed, args.max_new_tokens)
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def add_chat_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="talk with a model in the terminal (its chat template, streamed output)")
    p.add_argument("model", help="checkpoint file, run folder or Hugging Face folder")
    p.add_argument("--system", help="a system message that opens every conversation")
    add_sampling_flags(p, max_new_tokens=512)
    p.add_argument("--context", type=int, help=CONTEXT_HELP)
    add_expert_flags(p)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_chat)


class Printer:
    """Prints a reply as its tokens come, holding back a character still being formed (an incomplete UTF-8
    sequence decodes to U+FFFD until its last byte arrives)."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], None]) -> None:
        self.decode, self.write, self.ids, self.shown = decode, write, [], 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        safe = len(text.rstrip("\ufffd"))
        if safe > self.shown:
            self.write(text[self.shown : safe])
            self.shown = safe


def fit(messages: list[dict[str, str]], encode: Callable[[list[dict[str, str]]], list[int]], room: int) -> list[int]:
    """The conversation's prompt ids, dropping its oldest exchanges (never the system message or the last
    message) until the prompt leaves `room` tokens of the context; refused when the last message alone cannot."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids = encode(messages)
        if len(ids) <= room or len(messages) <= head + 1:
            break
        del messages[head : head + 2 if len(messages) > head + 2 else head + 1]
    if len(ids) > room:
        raise OneboxError(
            f"this message makes a prompt of {len(ids)} tokens, more than the {room} the context leaves: write a shorter one."
        )
    return ids


def cmd_chat(args: argparse.Namespace) -> int:
    from onebox.device import pick_device
    from onebox.infer.framing import load_framing
    from onebox.infer.generate import generate, load_model

    flags = sampling(args)
    model, tokenizer = load_model(args.model, pick_device(args.device), context=args.context, **expert_options(args))
    framing = load_framing(args.model, tokenizer)
    if tokenizer is None:
        raise OneboxError(f"{args.model} has no tokenizer.json, so onebox cannot chat with it.")
    context = model.config.seq_len
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    errors.print(
        f"chatting with {args.model} ({'its chat template' if framing.template else 'a plain User/Assistant format'}, "
        f"context {context} tokens); {HELP}",
        highlight=False,
    )
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            messages = list(opening)
            errors.print("(a new conversation)", highlight=False)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        prompt = fit(messages, framing.encode_chat, context - min(args.max_new_tokens, context // 2))
        printer = Printer(framing.decode, lambda text: console.print(text, end="", highlight=False, markup=False))
        console.print("model> ", end="", highlight=False)
        result = generate(model, prompt, args.max_new_tokens, **flags, stop_ids=framing.stops, on_token=printer)
        reply = framing.decode(result.samples[0])
        for stop in framing.stop_strings(chat=True):  # the plain format hands the turn back in text
            reply = reply.split(stop)[0]
        console.print(reply[printer.shown :] if len(reply) > printer.shown else "", highlight=False, markup=False)
        messages.append({"role": "assistant", "content": reply.strip()})
