"""Speed probe for the training step (issue 4): time variants side by side and profile where the step goes.

Run on the GPU machine (PYTHONPATH=src):
  python benchmarks/speed_probe.py --preset 600m-A --batch 32 --variants block,block+fp8,hf-compile \
      --profile block --out $OUT
A variant is a compile scope (eager, block, model) joined with options: fp8 (torchao float8, per-tensor
scales), fp8row (per-row scales), ckpt (activation checkpointing), clip2 (clipping as its own pass), sidestep (each
block's AdamW step on a second stream during backward), autotune (inductor's max-autotune: Triton matmul
templates with fused epilogues where they beat cuBLAS);
@B sets its batch. Prints one table row per variant, and
for each profiled variant the GPU time per step by kernel kind with the top kernels.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from onebox.bench.training import BenchSettings, Contender, build_hf, contender_step, measure_training, synthetic_batch
from onebox.config import PRESETS, ModelConfig, TrainConfig
from onebox.device import autocast_dtype
from onebox.model import Transformer
from onebox.optim import build_optimizer
from onebox.transforms import apply_float8, prepare_training

KINDS = [  # (kind, pattern on the kernel name), first match wins
    ("attention", r"flash|fmha|attention"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|sm90_|wgmma|splitk"),
    ("triton", r"triton"),
    ("copy/cast", r"copy|cast|memcpy|memset|fill"),
    ("reduce", r"reduce|norm"),
]


def builder(variant: str):
    parts = variant.split("+")
    scope = {"eager": "off", "block": "block", "model": "model"}[parts[0]]

    def build(config: ModelConfig, device: torch.device, settings: BenchSettings) -> Contender:
        with torch.device(device):
            model = Transformer(config)
        if "fp8row" in parts:
            apply_float8(model, device, recipe="rowwise")
        elif "fp8" in parts:
            apply_float8(model, device)
        loss = prepare_training(model, device, "bf16", scope, "ckpt" in parts)
        if "sidestep" in parts:
            return Contender(loss, side_stream_update(model, settings.lr, device), scope != "off")
        optimizer = build_optimizer(model, TrainConfig(lr=settings.lr, device=str(device)))

        def update() -> None:
            if "clip2" in parts:  # the separate clipping pass, as before the clip factor went into AdamW's grad_scale
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            else:
                optimizer.step(max_grad_norm=1.0)
            optimizer.zero_grad()

        return Contender(loss, update, scope != "off")

    return build


def side_stream_update(model: Transformer, lr: float, device: torch.device):
    """The optimizer overlapped with backward (variant +sidestep): as soon as a block's gradients are complete
    (post-accumulate-grad hooks), its fused AdamW step runs on a second CUDA stream, memory-bound beside the
    compute-bound backward of the blocks below; the embedding and final norm step after backward. Clipping
    uses the previous step's global norm (as the low-memory AdamW does). Returns the per-step update."""
    side = torch.cuda.Stream(device)
    square, clip = torch.zeros((), device=device), torch.ones((), device=device)

    def adamw(params: list[torch.Tensor]) -> torch.optim.AdamW:
        decay, flat = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": 0.1}, {"params": flat, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)

    def on_side(params: list[torch.Tensor], opt: torch.optim.AdamW) -> None:
        ready = torch.cuda.current_stream(device).record_event()
        with torch.cuda.stream(side):
            side.wait_event(ready)
            square.add_(torch.stack(torch._foreach_norm([p.grad for p in params])).square().sum())
            opt.grad_scale = 1.0 / clip
            opt.step()
            opt.grad_scale = None

    for block in model.layers:
        params = list(block.parameters())
        opt, left = adamw(params), [len(params)]

        def hook(_: torch.Tensor, params=params, opt=opt, left=left) -> None:
            left[0] -= 1
            if left[0] == 0:
                left[0] = len(params)
                on_side(params, opt)

        for q in params:
            q.register_post_accumulate_grad_hook(hook)
    rest = [q for name, q in model.named_parameters() if not name.startswith("layers.")]
    rest_opt = adamw(rest)

    def update() -> None:
        torch.cuda.current_stream(device).wait_stream(side)
        square.add_(torch.stack(torch._foreach_norm([q.grad for q in rest])).square().sum())
        rest_opt.grad_scale = 1.0 / clip
        rest_opt.step()
        rest_opt.grad_scale = None
        clip.copy_(torch.clamp(1.0 / (square.sqrt() + 1e-6), max=1.0))  # the next step's factor
        square.zero_()
        model.zero_grad(set_to_none=True)

    return update


def contender(variant: str, config: ModelConfig, device: torch.device, settings: BenchSettings) -> Contender:
    # +autotune: inductor's max-autotune for the compiled graphs (Triton matmul templates timed against cuBLAS, with the
    # elementwise work after a product fused into its epilogue where a template wins); set per variant, compiled lazily
    torch._inductor.config.max_autotune = "autotune" in variant.split("+")
    if variant.startswith("hf"):
        return build_hf(config, device, settings, compile_model=variant == "hf-compile")
    return builder(variant)(config, device, settings)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def profile(variant: str, config: ModelConfig, device: torch.device, settings: BenchSettings, out: Path, steps: int = 3) -> str:
    torch._dynamo.reset()
    torch.manual_seed(0)
    c = contender(variant, config, device, settings)
    x, y = synthetic_batch(config, settings.batch, device, 0)
    dtype = autocast_dtype(device, "auto")

    def step() -> None:
        contender_step(c, x, y, device, dtype)

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    trace = out / f"trace-{config.name}-{variant.replace('+', '_')}.json"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    trace.unlink()  # large; the summary below is what is kept
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        by_kind[kind_of(e["name"])] += e["dur"] / 1000 / steps
        by_name[e["name"]][0] += e["dur"] / 1000 / steps
        by_name[e["name"]][1] += 1 / steps
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1000 / steps
    busy = sum(by_kind.values())
    lines = [f"profile {config.name} {variant} batch {settings.batch}: {span:.1f} ms/step span, {busy:.1f} ms kernels ({busy / span:.0%} busy)"]
    lines += [f"  {kind:10s} {ms:7.2f} ms  {ms / busy:5.1%}" for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines.append("  top kernels (ms/step, launches/step):")
    for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]:
        lines.append(f"    {ms:7.2f} {n:5.0f}  {kind_of(name):9s} {name[:110]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="600m-A")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variants", default="block,block+fp8,hf-compile")
    parser.add_argument("--profile", default="", help="comma-separated variants to profile")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--out", default="/tmp/out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    config = PRESETS[args.preset]
    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        name, _, batch = variant.partition("@")
        settings = BenchSettings(batch=int(batch or args.batch), steps=args.steps, timed_steps=args.timed_steps)
        kind = name if name.startswith("hf") else "onebox"
        try:
            result = measure_training(kind, config, device, settings, None if kind != "onebox" else builder(name))
        except Exception as err:  # a probe reports a failing variant and goes on with the rest
            print(f"{config.name} {variant}: failed: {type(err).__name__}: {err}", flush=True)
            continue
        rows.append((variant, settings.batch, result))
        print(f"{config.name} {variant}: {json.dumps({k: v for k, v in result.items() if k not in ('loss_trace', 'estimate')})}", flush=True)
    for variant in [v for v in args.profile.split(",") if v]:
        name, _, batch = variant.partition("@")
        text = profile(name, config, device, BenchSettings(batch=int(batch or args.batch)), out)
        print(text, flush=True)
        (out / f"profile-{config.name}-{variant.replace('+', '_').replace('@', '_b')}.txt").write_text(text)
    print(f"\n{'variant':28s} {'batch':>5s} {'ms/step':>8s} {'fwd':>6s} {'bwd':>6s} {'opt':>5s} {'tok/s':>9s} {'MFU':>6s} {'GB':>5s} {'tok/J':>6s} {'1st s':>6s} loss_end")
    for variant, batch, r in rows:
        if r["status"] != "ok":
            print(f"{variant:28s} {batch:5d} {r['status']}")
            continue
        tpj = r["tokens_per_joule"] or float("nan")
        print(f"{variant:28s} {batch:5d} {r['ms_per_step']:8.1f} {r['forward_ms']:6.1f} {r['backward_ms']:6.1f} {r['optimizer_ms']:5.1f} "
              f"{r['tokens_per_second']:9,.0f} {r['mfu']:6.1%} {r['peak_memory_bytes'] / 1e9:5.1f} {tpj:6.1f} {r['first_step_seconds']:6.1f} {r['loss_end']:.4f}")


if __name__ == "__main__":
    main()
