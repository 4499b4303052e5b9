"""Accuracy probe: the low-memory AdamW against torch's AdamW on the CPU, one variant per run.

  PYTHONPATH=src python benchmarks/accuracy_probe.py VARIANT[,VARIANT...] [--steps 300] [--dim 256 --layers 4]
  PYTHONPATH=src python benchmarks/accuracy_probe.py ref,hook,w16 --preset 600m-A --batch 32 --device cuda

Trains a small model on the default corpus (onebox prepare's Shakespeare, ~/.cache/onebox/shakespeare-bpe8192)
with bf16 autocast, batch 16 x 128 tokens, lr 6e-4 (30 warmup steps, cosine), clip 1.0, and prints the mean
train loss of the last 50 steps, the loss at steps 90-110 and a validation loss. VARIANT is `ref` (torch
AdamW, fp32 weights) or a join of: w16 (bf16 matrices, stochastic rounding; norm vectors fp32; v16: those bf16 too), m16 / m8 (bf16 / 8-bit
moments; fp32 otherwise), hook (update inside backward), noclip (no clipping, for both), ckpt (activation
checkpointing), compile (per-block torch.compile); any other name (e.g. `lm`) is the low-memory AdamW
with fp32 weights and moments, stepped at step(). --preset takes a preset's shape (and its seq_len) instead
of --dim/--layers; --device cuda runs on the GPU (bf16 autocast there too). Batch 4 x 256 (and 8 x 512 with
--dim 512 --layers 8), one run per variant, two at a time, fits 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from onebox.config import ModelConfig, TrainConfig
from onebox.data import BatchLoader, default_data_dir, find_shards, prepare_default_corpus
from onebox.lowmem import LowMemAdamW
from onebox.model import cross_entropy_loss
from onebox.optim import build_optimizer, lr_factor
from onebox.plan import Strategy
from onebox.presets import preset
from onebox.training.recipe import build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", help="comma-separated, run one after another")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--preset", default="", help="a preset's shape instead of --dim/--layers")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.preset:
        config = preset(args.preset)
    else:
        config = ModelConfig(
            name="probe",
            dim=args.dim,
            hidden=3 * args.dim,
            layers=args.layers,
            heads=args.dim // 64,
            seq_len=128,
            vocab_size=8192,
        )
    data = default_data_dir()
    if not data.is_dir():
        prepare_default_corpus(data)
    for variant in args.variants.split(","):
        run(variant, config, args.batch, args.steps, args.device, data)


def run(variant: str, config: ModelConfig, batch: int, steps: int, device: str, data) -> None:
    train = TrainConfig(
        batch_size=batch, max_steps=steps, lr=6e-4, warmup_steps=30, grad_clip=0.0 if "noclip" in variant else 1.0
    )
    train_shards, val_shards = find_shards(data)
    loader = BatchLoader(train_shards, batch, config.seq_len, seed=1)
    torch.manual_seed(0)
    # The variant's weights and checkpointing; its optimizer is swapped in below (built without hooks here,
    # so only the variant's own optimizer updates inside backward).
    chosen = Strategy("probe", "w16" in variant, False, False, "ckpt" in variant, variant)
    train = dataclasses.replace(
        train, device=device, precision="bf16", compile="block" if "compile" in variant else "off", memory="standard"
    )
    recipe = build(config, train, torch.device(device), chosen)  # as `onebox train` builds a run
    model = recipe.model
    if "v16" in variant:  # norm vectors in bf16 too (the bf16 strategies keep them fp32)
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    if variant == "ref":
        recipe.optimizer = build_optimizer(model, train)
    else:  # the low-memory AdamW with the variant's moments, fp32 ones included (which no strategy uses)
        moments = "int8" if "m8" in variant else (torch.bfloat16 if "m16" in variant else torch.float32)
        recipe.optimizer = LowMemAdamW(model, train, moments, False, "hook" in variant)

    def next_batch():
        return tuple(t.to(device) for t in loader.next_batch())

    losses = []
    started = time.time()
    for step in range(steps):
        recipe.set_lr_factor(lr_factor(step, train))
        losses.append(recipe.step(next_batch, 1, train.grad_clip))
    losses = torch.stack(losses).float().cpu().tolist()
    val = BatchLoader(val_shards, batch, config.seq_len, shuffle=False)
    with torch.no_grad(), torch.autocast(torch.device(device).type, torch.bfloat16):
        val_loss = (
            sum(
                cross_entropy_loss(model(a.to(device)), b.to(device)).item()
                for a, b in (val.next_batch() for _ in range(10))
            )
            / 10
        )
    windows = " ".join(
        f"@{s} {sum(losses[max(0, s - 5) : s + 5]) / len(losses[max(0, s - 5) : s + 5]):.4f}"
        for s in (10, 25, 50, 100, 200)
        if s < steps
    )
    print(
        f"{variant:18s} train(last50) {sum(losses[-50:]) / len(losses[-50:]):.4f} val {val_loss:.4f} {windows} ({time.time() - started:.0f}s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
