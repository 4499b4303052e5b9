"""Import probe: the peak host memory of importing a Hugging Face folder of a real model's shape.

  PYTHONPATH=src python benchmarks/import_probe.py --preset llama3.1-8b --folder /tmp/llama8b [--device cpu]

Writes a folder of that shape with random bf16 weights (shards of at most 2 GB, the index, the family's
config.json: as transformers' save_pretrained lays it out; skipped when the folder is already there),
then imports it in a fresh process with `model_from_hf(folder, device, bfloat16)` and prints the
process's peak resident memory beside the model's size: the import reads each tensor from the
memory-mapped shards as it is copied into the model, so on the CPU the peak is about one model, on a
GPU about one tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from onebox.families import hf_config
from onebox.model import build_model
from onebox.presets import preset

SHARD_BYTES = 2 * 10**9

MEASURE = """
import resource, sys, time, torch
from onebox.export import model_from_hf
started = time.perf_counter()
model, _ = model_from_hf(sys.argv[1], sys.argv[2], torch.bfloat16)
seconds = time.perf_counter() - started
params = sum(p.numel() for p in model.parameters())
print(f"{params} {seconds:.1f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")
"""


def write_folder(name: str, folder: Path) -> None:
    """A folder of the preset's shape and family with random bf16 weights, each shard written once full."""
    config = preset(name)
    folder.mkdir(parents=True)
    shapes = {k: v.shape for k, v in build_model(config, "meta").state_dict().items()}
    plan: list[list[str]] = [[]]  # the tensors of each shard, at most SHARD_BYTES each
    size = 0
    for key, shape in shapes.items():
        numel = torch.Size(shape).numel()
        if size + 2 * numel > SHARD_BYTES and plan[-1]:
            plan.append([])
            size = 0
        plan[-1].append(key)
        size += 2 * numel
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, keys in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for key in keys:
            tensor = torch.empty(shapes[key], dtype=torch.bfloat16)
            tensor.normal_(0.0, 0.02, generator=generator) if tensor.dim() > 1 else tensor.fill_(1.0)
            shard[key if key == "lm_head.weight" else f"model.{key}"] = tensor
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        print(f"wrote {file} ({sum(t.numel() for t in shard.values()) * 2 / 1e9:.2f} GB)", flush=True)
    total = sum(torch.Size(s).numel() for s in shapes.values()) * 2
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(hf_config(config, "bfloat16", None)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.1-8b")
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not args.folder.exists():
        started = time.perf_counter()
        write_folder(args.preset, args.folder)
        print(f"folder written in {time.perf_counter() - started:.0f} s", flush=True)
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(args.folder), args.device], capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    params, seconds, peak = done.stdout.split()
    model_bytes = int(params) * 2
    print(
        f"{args.preset}: {int(params) / 1e9:.2f}B parameters, {model_bytes / 1e9:.2f} GB in bf16; imported to {args.device} "
        f"in {seconds} s; peak host memory {int(peak) / 1e9:.2f} GB = {int(peak) / model_bytes:.2f} x the model"
    )


if __name__ == "__main__":
    main()
