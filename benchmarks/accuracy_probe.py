"""Accuracy probe (issue 5): the low-memory AdamW against torch's AdamW on the CPU, one variant per run.

  PYTHONPATH=src python benchmarks/accuracy_probe.py VARIANT [--steps 300] [--dim 256 --layers 4]

Trains a small model on the default corpus (onebox prepare's Shakespeare, ~/.cache/onebox/shakespeare-bpe8192)
with bf16 autocast, batch 16 x 128 tokens, lr 6e-4 (30 warmup steps, cosine), clip 1.0, and prints the mean
train loss of the last 50 steps, the loss at steps 90-110 and a validation loss. VARIANT is `ref` (torch
AdamW, fp32 weights) or a join of: w16 (bf16 matrices, stochastic rounding; norm vectors fp32; v16: those bf16 too), m16 / m8 (bf16 / 8-bit
moments; fp32 otherwise), hook (update inside backward), noclip (no clipping, for both), ckpt (activation
checkpointing), compile (per-block torch.compile). The figures in benchmarks/NOTES.md (session 11) came
from this at 4 x 256 (and 8 x 512 with --dim 512 --layers 8), one run per variant, two at a time on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import torch

from onebox.config import ModelConfig, TrainConfig
from onebox.data import BatchLoader, default_data_dir, find_shards, prepare_default_corpus
from onebox.lowmem import LowMemAdamW, keep_vectors_fp32
from onebox.model import build_model, cross_entropy_loss
from onebox.optim import build_optimizer, lr_factor
from onebox.transforms import apply_activation_checkpointing, apply_compile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    variant = args.variant
    torch.set_num_threads(1)
    config = ModelConfig(name="probe", dim=args.dim, hidden=3 * args.dim, layers=args.layers, heads=args.dim // 64, seq_len=128, vocab_size=8192)
    train = TrainConfig(batch_size=16, max_steps=args.steps, lr=6e-4, warmup_steps=30, grad_clip=0.0 if "noclip" in variant else 1.0)
    data = default_data_dir()
    if not data.is_dir():
        prepare_default_corpus(data)
    train_shards, val_shards = find_shards(data)
    loader = BatchLoader(train_shards, 16, 128, seed=1)
    torch.manual_seed(0)
    model = build_model(config, "cpu", torch.bfloat16 if "w16" in variant else torch.float32)
    if "w16" in variant and "v16" not in variant:  # as the bf16 strategies do (v16: vectors in bf16 too, as before)
        keep_vectors_fp32(model)
    if variant == "ref":
        optimizer = build_optimizer(model, train)
    else:
        moments = "int8" if "m8" in variant else (torch.bfloat16 if "m16" in variant else torch.float32)
        optimizer = LowMemAdamW(model, train, moments, False, "hook" in variant)
    if "ckpt" in variant:
        apply_activation_checkpointing(model)
    if "compile" in variant:
        apply_compile(model)
    losses = []
    started = time.time()
    for step in range(args.steps):
        optimizer.set_lr_factor(lr_factor(step, train))
        x, y = loader.next_batch()
        with torch.autocast("cpu", torch.bfloat16):
            loss = cross_entropy_loss(model(x), y)
        loss.backward()
        optimizer.step(train.grad_clip)
        optimizer.zero_grad()
        losses.append(loss.item())
    val = BatchLoader(val_shards, 16, 128, shuffle=False)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        val_loss = sum(cross_entropy_loss(model(a), b).item() for a, b in (val.next_batch() for _ in range(10))) / 10
    print(f"{variant:18s} train(last50) {sum(losses[-50:]) / 50:.4f} val {val_loss:.4f} @100 {sum(losses[90:110]) / 20:.4f} ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    main()
