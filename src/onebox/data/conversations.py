"""Conversations for fine-tuning: JSONL chat, instruction and preference data rendered with the model's chat
template into tokens and a loss mask that covers the assistant's tokens only.

Formats (one JSON object a line):
- chat: {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}, as
  OpenAI's fine-tuning files and Hugging Face datasets write them;
- instruction: {"instruction" (or "prompt"), optional "input" and "system", "output" (or "response",
  "completion")}: one user turn and one assistant turn;
- preference: {"prompt": text or messages, "chosen": text or messages, "rejected": text or messages}: two
  conversations sharing the prompt, for DPO.

The mask: a conversation is rendered whole (no generation prompt), and each assistant turn's characters
are those between the rendering of the turns before it with the generation prompt and the rendering
through it, so the turn's end marker (the template's end-of-turn token) is learnt with it, as
transformers' assistant masks and TRL mark them. A token is in the loss when its first character lies in
such a span. A template that renders an earlier turn differently once later turns follow (so that these
renderings are not prefixes of the whole) is refused with the turn named. Data is untrusted: lines are
bounded in size, every field is checked, and the template renders in chat.py's sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onebox.chat import ChatTemplate, TemplateError
from onebox.errors import OneboxError

FORMATS = ("chat", "instruction", "preference")
ROLES = ("system", "user", "assistant", "tool")
MAX_LINE_BYTES = 4 << 20  # the largest JSONL line read (a conversation of about a million tokens)
# ChatML, for tokenizers that bring no template of their own (onebox's own BPE)
DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

Messages = list[dict[str, str]]


def read_records(path: Path, fmt: str) -> Iterator[tuple[int, list[Messages]]]:
    """(line number, conversations) for each non-blank line: one conversation (chat, instruction) or two
    (preference: chosen, then rejected)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path}, line {number}"
            if len(raw) > MAX_LINE_BYTES:
                raise OneboxError(f"{where} is longer than {MAX_LINE_BYTES >> 20} MB: split the conversation.")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise OneboxError(f"{where} is not valid JSON ({err}): each line must be one JSON object.") from None
            if not isinstance(record, dict):
                raise OneboxError(f"{where} is a JSON {type(record).__name__}, not an object: {_expected(fmt)}.")
            yield number, conversations_of(record, fmt, where)


def _expected(fmt: str) -> str:
    return {
        "chat": 'each line holds {"messages": [{"role": ..., "content": ...}, ...]}',
        "instruction": 'each line holds {"instruction": ..., "output": ...} (optional "input", "system")',
        "preference": 'each line holds {"prompt": ..., "chosen": ..., "rejected": ...}',
    }[fmt]


def conversations_of(record: dict[str, Any], fmt: str, where: str) -> list[Messages]:
    """The conversations one record stands for, checked."""
    if fmt == "chat":
        return [_messages(record.get("messages"), where, "messages", fmt)]
    if fmt == "instruction":
        prompt = _text(record, ("instruction", "prompt"), where, fmt)
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise OneboxError(f'{where}: "input" must be text: {_expected(fmt)}.')
        messages = [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) else []
        messages.append({"role": "user", "content": prompt + (f"\n\n{extra}" if extra else "")})
        messages.append(
            {"role": "assistant", "content": _text(record, ("output", "response", "completion"), where, fmt)}
        )
        return [messages]
    if fmt == "preference":
        prompt = record.get("prompt")
        prompt_messages = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else _messages(prompt, where, "prompt", fmt, False)
        )
        pair = []
        for key in ("chosen", "rejected"):
            answer = record.get(key)
            turns = (
                [{"role": "assistant", "content": answer}]
                if isinstance(answer, str)
                else _messages(answer, where, key, fmt)
            )
            pair.append(prompt_messages + turns)
        return pair
    raise OneboxError(f"unknown data format {fmt!r}: choose text or one of {', '.join(FORMATS)}.")


def _text(record: dict[str, Any], keys: tuple[str, ...], where: str, fmt: str) -> str:
    for key in keys:
        if isinstance(record.get(key), str):
            return record[key]
    raise OneboxError(f"{where} has no text under {' or '.join(repr(k) for k in keys)}: {_expected(fmt)}.")


def _messages(value: Any, where: str, key: str, fmt: str, need_assistant: bool = True) -> Messages:
    if not isinstance(value, list) or not value:
        raise OneboxError(f"{where}: {key!r} must be a non-empty list of messages: {_expected(fmt)}.")
    out = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise OneboxError(
                f"{where}: message {i} of {key!r} needs a role ({', '.join(ROLES)}) and text content, got {str(message)[:80]!r}."
            )
        out.append({"role": message["role"], "content": message["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise OneboxError(f"{where}: {key!r} has no assistant turn, so nothing to learn: add one or drop the line.")
    return out


def masked_tokens(
    messages: Messages, template: ChatTemplate, tokenizer: Any, where: str
) -> tuple[list[int], list[int]]:
    """The conversation's token ids and its loss mask (1 on the assistant's tokens)."""
    try:
        text = template.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = template.render(messages[:i], add_generation_prompt=True)
            through = template.render(messages[: i + 1], add_generation_prompt=False)
            if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
                raise OneboxError(
                    f"{where}: the chat template renders the turns before assistant turn {i} differently once later turns "
                    "follow, so the assistant's tokens cannot be told apart: give one assistant turn a line, or another template."
                )
            spans.append((len(before), len(through)))
    except TemplateError as err:
        raise OneboxError(f"{where}: {err}") from None
    encoding = tokenizer.encode(text, add_special_tokens=False)
    mask = [int(any(start <= first < stop for start, stop in spans)) for first, _ in encoding.offsets]
    return list(encoding.ids), mask


# --- writing them ------------------------------------------------------------------------------


def write_conversations(
    files: list[Path],
    fmt: str,
    out_dir: Path,
    tokenizer_path: str | Path,
    val_fraction: float,
    say: Any,
) -> dict[str, Any]:
    """Tokens, masks and example offsets of every conversation into out_dir (a staging folder): for each split
    <split>_000000.bin (the tokens, as text shards are written), <split>_mask.npy (uint8, one a token) and
    <split>_examples.npy (int64: where each example starts, then the end). Every round(1/val_fraction)-th
    record is held out (a preference pair stays together); the tokenizer and template come from the model."""
    import time

    import numpy as np

    from onebox.chat import load_chat_template
    from onebox.data.shards import write_shard
    from onebox.tokenizer import load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_path)
    folder = Path(tokenizer_path) if Path(tokenizer_path).is_dir() else Path(tokenizer_path).parent
    template = load_chat_template(folder)
    if template is None:
        say(f"{folder} has no chat template: conversations are rendered as ChatML (<|im_start|>role ... <|im_end|>)")
        template = ChatTemplate(DEFAULT_TEMPLATE)
    records = [(f"{path}, line {n}", convs) for path in files for n, convs in read_records(path, fmt)]
    if not records:
        raise OneboxError(f"the input holds no {fmt} records: {_expected(fmt)}.")
    every = min(max(2, round(1 / val_fraction)), len(records))
    splits: dict[str, dict[str, list]] = {s: {"ids": [], "mask": [], "starts": []} for s in ("train", "val")}
    for index, (where, conversations) in enumerate(records):
        split = splits["val" if len(records) > 1 and index % every == every - 1 else "train"]
        for messages in conversations:
            ids, mask = masked_tokens(messages, template, tokenizer, where)
            split["starts"].append(sum(len(x) for x in split["ids"]))
            split["ids"].append(ids)
            split["mask"].append(mask)
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    meta: dict[str, Any] = {"format": "llm.c token shards (magic 20240520) with loss masks", "kind": fmt}
    for name, split in splits.items():
        if not split["ids"]:
            raise OneboxError(
                f"the {'validation' if name == 'val' else 'training'} split came out empty: give more records"
                + (" or a larger --val-fraction." if name == "val" else ".")
            )
        tokens = np.fromiter((t for ids in split["ids"] for t in ids), dtype=dtype)
        mask = np.fromiter((m for row in split["mask"] for m in row), dtype=np.uint8)
        starts = np.array([*split["starts"], len(tokens)], dtype=np.int64)
        write_shard(out_dir / f"{name}_000000.bin", tokens)
        np.save(out_dir / f"{name}_mask.npy", mask)
        np.save(out_dir / f"{name}_examples.npy", starts)
        meta[f"{name}_tokens"], meta[f"{name}_examples"] = int(len(tokens)), len(split["ids"])
        meta[f"{name}_loss_tokens"] = int(mask.sum())
    tokenizer.save(str(out_dir / "tokenizer.json"))
    meta.update(vocab_size=vocab, dtype=np.dtype(dtype).name, records=len(records), sources=[str(p) for p in files])
    meta["seconds"] = round(time.perf_counter() - started, 2)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    say(
        f"{len(records)} {fmt} records: {meta['train_examples']} training examples ({meta['train_tokens']:,} tokens, "
        f"{meta['train_loss_tokens']:,} in the loss), {meta['val_examples']} held out"
    )
    return meta
