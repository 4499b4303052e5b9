"""`onebox eval MODEL --data DIR`: a model's loss, perplexity and bits per byte on held-out token shards.

The model is any that `generate` takes (a Hugging Face folder, a run folder or a checkpoint); the data is a
folder from `onebox prepare` tokenized with the model's own tokenizer (checked as `--init-from` checks it).
Its validation shards are cut into windows of the context and every window is scored once, in order,
with the training loop's evaluation (the mean of the windows' token cross-entropies); perplexity is
exp(loss) and bits per byte loss / ln 2 / (bytes per token of the split, from meta.json).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from onebox.data import dataset_info, make_loader
from onebox.device import autocast_dtype
from onebox.errors import OneboxError
from onebox.infer.generate import load_model
from onebox.training.start import check_tokenizer
from onebox.training.trainer import evaluate


def evaluate_model(
    model_path: str | Path,
    data_dir: str | Path,
    device: torch.device,
    batch: int = 8,
    context: int | None = None,
    max_batches: int | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """{tokens, windows, loss, perplexity, bits_per_byte} of the model on the folder's validation split."""
    info = dataset_info(data_dir)
    if not info.val_shards:
        raise OneboxError(
            f"{data_dir} holds no validation shards (*val*.bin): prepare the held-out text with onebox prepare."
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model(model_path, device, dtype)
    check_tokenizer(info, tokenizer.to_str() if tokenizer is not None else None, str(model_path), say)
    seq_len = min(context or model.config.seq_len, model.config.seq_len)
    loader = make_loader(
        info.path,
        "val",
        info.val_shards,
        batch,
        seq_len,
        shuffle=False,
        vocab_size=model.config.vocab_size,
        partial=True,
    )
    batches = loader.windows // loader.batch
    if max_batches is not None:
        batches = min(batches, max_batches)
    loss = evaluate(model, loader, batches, device, autocast_dtype(device, "auto"))
    windows = batches * loader.batch
    per_byte = info.val_bytes_per_token
    result = {
        "tokens": windows * seq_len,
        "windows": windows,
        "seq_len": seq_len,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss / math.log(2) / per_byte if per_byte else None,
    }
    bpb = "n/a (no meta.json)" if result["bits_per_byte"] is None else f"{result['bits_per_byte']:.4f}"
    say(
        f"{model.config.name} on {info.path}: {result['tokens']:,} tokens ({windows} windows of {seq_len}) | "
        f"loss {loss:.4f} | perplexity {result['perplexity']:.2f} | bits/byte {bpb}"
    )
    return result
