"""Speed probe for the training step: time variants side by side and profile where the step goes.

Run on the GPU machine (PYTHONPATH=src):
  python benchmarks/speed_probe.py --preset 600m-A --batch 32 --variants block,block+fp8,hf-compile \
      --profile block --out $OUT
A variant is a compile scope (eager, block, model) joined with options: fp8 (torchao float8, per-tensor
scales), ckpt (activation checkpointing), clip2 (clipping as its own pass), torchadam (torch's fused AdamW, not onebox's Triton one), sidestep (each
block's AdamW step on a second stream during backward), autotune (inductor's max-autotune: Triton matmul
templates with fused epilogues where they beat cuBLAS), cdt (inductor's coordinate-descent tuning of its Triton kernels);
@B sets its batch. Prints one table row per variant, and
for each profiled variant the GPU time per step by kernel kind with the top kernels.
--floor first times the step's irreducible parts alone (its matrix products through cuBLAS, attention
through SDPA, the AdamW step with clipping, onebox's and torch's) and prints the best MFU any
bf16 step built from these library kernels could reach: nothing elementwise is counted.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch

from onebox.adamw import TritonAdamW, triton_ready
from onebox.bench.decode import memory_bandwidth
from onebox.bench.timing import PhaseClock, median
from onebox.bench.training import BenchSettings, build_hf, contender_step, measure_training, synthetic_batch
from onebox.config import ModelConfig, TrainConfig
from onebox.device import peak_flops
from onebox.model import Transformer
from onebox.optim import OptimizerSet, param_groups
from onebox.plan import strategy
from onebox.presets import PRESETS
from onebox.training.recipe import Recipe
from onebox.training.recipe import build as build_run

KINDS = [  # (kind, pattern on the kernel name), first match wins
    ("attention", r"flash|fmha|attention"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|sm90_|wgmma|splitk"),
    ("triton", r"triton"),
    ("copy/cast", r"copy|cast|memcpy|memset|fill"),
    ("reduce", r"reduce|norm"),
]


def set_inductor_knobs(parts: list[str]) -> None:
    """+autotune: inductor's max-autotune for the compiled graphs (Triton matmul templates timed against cuBLAS, with the
    elementwise work after a product fused into its epilogue where a template wins); +cdt: each fused Triton kernel's
    launch settings searched. Read when the blocks compile (lazily, in the first step), so set per variant."""
    torch._inductor.config.max_autotune = "autotune" in parts
    torch._inductor.config.coordinate_descent_tuning = "cdt" in parts


class _Update:
    """An optimizer the probe swaps into a recipe: its own update per step (the recipe zeroes nothing more)."""

    def __init__(self, update, param_groups=()) -> None:
        self.update, self.param_groups = update, list(param_groups)

    def step(self, clip: float) -> None:
        self.update()

    def zero_grad(self) -> None:
        pass


def builder(variant: str):
    """A variant built as `onebox train` builds a run (the recipe: compile scope, fp8, checkpointing), then
    with the probe's optimizer experiments swapped in (sidestep, torchadam, clip2)."""
    parts = variant.split("+")
    scope = {"eager": "off", "block": "block", "model": "model"}[parts[0]]

    def build(config: ModelConfig, device: torch.device, settings: BenchSettings) -> Recipe:
        set_inductor_knobs(parts)
        train = TrainConfig(
            lr=settings.lr,
            device=str(device),
            precision="fp8" if "fp8" in parts else "bf16",
            compile=scope,
            activation_checkpointing="ckpt" in parts,
            memory="standard",
        )
        recipe = build_run(config, train, device, strategy("standard"))
        model = recipe.model
        if "sidestep" in parts:
            recipe.optimizer = _Update(side_stream_update(model, settings.lr, device))
        elif "torchadam" in parts:  # torch's fused AdamW instead of onebox's Triton one
            recipe.optimizer = OptimizerSet(
                [
                    torch.optim.AdamW(
                        param_groups(model, train), betas=(train.beta1, train.beta2), eps=train.eps, fused=True
                    )
                ]
            )
        elif "clip2" in parts:  # the separate clipping pass, as before the clip factor went into AdamW's grad_scale
            optimizer = recipe.optimizer

            def update() -> None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()

            recipe.optimizer = _Update(update)
        return recipe

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
        groups = [
            g for g in ({"params": decay, "weight_decay": 0.1}, {"params": flat, "weight_decay": 0.0}) if g["params"]
        ]
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


def contender(variant: str, config: ModelConfig, device: torch.device, settings: BenchSettings) -> Recipe:
    set_inductor_knobs([])
    if variant.startswith("hf"):
        return build_hf(config, device, settings, compile_model=variant == "hf-compile")
    return builder(variant)(config, device, settings)


def gpu_ms(fn, device: torch.device, repeats: int = 10) -> float:
    """Median milliseconds of fn() (two warm-up calls; CUDA events on the GPU, the host clock elsewhere: a smoke run on CPU)."""
    for _ in range(2):
        fn()
    clock, marks = PhaseClock(device), []
    for _ in range(repeats):
        start = clock.mark()
        fn()
        marks.append((start, clock.mark()))
    clock.finish()
    return median([clock.ms(a, b) for a, b in marks])


def _products_ms(shapes: list[tuple[int, int]], tokens: int, device: torch.device) -> float:
    """One forward and backward's matrix products of linear layers of these (out, in) shapes over `tokens` rows, bf16:
    y = x W^T, dx = dy W, dW = dy^T x, as autograd runs them for F.linear."""
    bf16 = torch.bfloat16
    operands = [
        (
            torch.randn(tokens, i, device=device, dtype=bf16),
            torch.randn(o, i, device=device, dtype=bf16),
            torch.randn(tokens, o, device=device, dtype=bf16),
        )
        for o, i in shapes
    ]

    def run() -> None:
        for x, w, dy in operands:
            torch.nn.functional.linear(x, w)
            dy @ w
            dy.t() @ x

    return gpu_ms(run, device)


def _attention_ms(config: ModelConfig, batch: int, device: torch.device) -> float:
    """One layer's causal SDPA forward and backward; the faster of two layouts of q/k/v: (B, T, H, D) transposed, as the
    projections make them, and contiguous (B, H, T, D)."""
    best = float("inf")
    for transposed in (True, False):
        q, k, v = (
            torch.randn(batch, config.seq_len, heads, config.head_size, device=device, dtype=torch.bfloat16).transpose(
                1, 2
            )
            for heads in (config.heads, config.kv_heads, config.kv_heads)
        )
        q, k, v = ((t if transposed else t.contiguous()).requires_grad_() for t in (q, k, v))
        grad = torch.randn(batch, config.heads, config.seq_len, config.head_size, device=device, dtype=torch.bfloat16)

        def run(q=q, k=k, v=v, grad=grad) -> None:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=config.kv_heads != config.heads
            )
            torch.autograd.grad(out, (q, k, v), grad)

        best = min(best, gpu_ms(run, device))
    return best


def _optimizer_ms(config: ModelConfig, device: torch.device, triton: bool) -> float:
    """The update as onebox runs it (OptimizerSet.step): global gradient norm, then AdamW over fp32 weights of the model's
    sizes with the clip factor as its grad_scale; onebox's Triton AdamW or torch's fused one. NaN where Triton cannot run."""
    with torch.device("meta"):
        sizes = [p.shape for p in Transformer(config).parameters()]
    params = [torch.zeros(shape, device=device, requires_grad=True) for shape in sizes]
    if triton and not triton_ready(params):
        return float("nan")
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kwargs = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
    optimizer = TritonAdamW(params, **kwargs) if triton else torch.optim.AdamW(params, fused=True, **kwargs)

    def run() -> None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        optimizer.grad_scale = 1.0 / torch.clamp(1.0 / (norm + 1e-6), max=1.0)
        optimizer.step()

    return gpu_ms(run, device, repeats=5)


def step_floor(config: ModelConfig, batch: int, device: torch.device) -> dict[str, float]:
    """The step's irreducible parts timed alone: every matrix product of forward and backward (one layer's set timed,
    times layers, plus the output projection), causal attention forward and backward, and the optimizer. No norm, RoPE,
    SwiGLU, residual add, cast or loss is counted, so floor_mfu bounds any bf16 step built from these library kernels:
    the work left out only adds time; floor_bytes_mfu bounds it with any optimizer (AdamW's 28 bytes a parameter at the
    copy bandwidth; n/a off CUDA). square_tflops is the card's bf16 product rate on one 8192^3 product."""
    tokens = batch * config.seq_len
    layer = [
        (config.dim, config.dim),
        (config.kv_dim, config.dim),
        (config.kv_dim, config.dim),
        (config.dim, config.dim),
        (config.hidden, config.dim),
        (config.hidden, config.dim),
        (config.dim, config.hidden),
    ]
    products_ms = config.layers * _products_ms(layer, tokens, device) + _products_ms(
        [(config.vocab_size, config.dim)], tokens, device
    )
    attention_ms = config.layers * _attention_ms(config, batch, device)
    optimizer_torch_ms = _optimizer_ms(config, device, triton=False)
    torch.cuda.empty_cache()
    optimizer_triton_ms = _optimizer_ms(config, device, triton=True)
    optimizer_ms = min(
        t for t in (optimizer_torch_ms, optimizer_triton_ms) if not math.isnan(t)
    )  # NaN: Triton cannot run here
    # AdamW over fp32 weights moves at least 28 bytes a parameter (weight, gradient, two moments read; weight, moments written)
    bandwidth = memory_bandwidth(device)
    optimizer_bytes_ms = 28 * config.num_params() / bandwidth * 1e3 if bandwidth else float("nan")
    size = 8192 if device.type == "cuda" else 512
    big = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    square = 2 * size**3 / (gpu_ms(lambda: big @ big, device) / 1e3)
    total = products_ms + attention_ms + optimizer_ms
    least = products_ms + attention_ms + optimizer_bytes_ms  # with an optimizer at the copy bandwidth
    model_flops, peak = config.flops_per_token() * tokens, peak_flops(device) or 989e12
    return {
        "products_ms": products_ms,
        "products_tflops": 6 * config.num_matmul_params() * tokens / products_ms / 1e9,
        "attention_ms": attention_ms,
        "optimizer_ms": optimizer_ms,
        "optimizer_torch_ms": optimizer_torch_ms,
        "optimizer_triton_ms": optimizer_triton_ms,
        "optimizer_bytes_ms": optimizer_bytes_ms,
        "floor_ms": total,
        "floor_mfu": model_flops / (total / 1e3) / peak,
        "floor_bytes_ms": least,
        "floor_bytes_mfu": model_flops / (least / 1e3) / peak,
        "ms_at_55pct_mfu": model_flops / (0.55 * peak) * 1e3,
        "square_tflops": square / 1e12,
    }


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def profile(
    variant: str, config: ModelConfig, device: torch.device, settings: BenchSettings, out: Path, steps: int = 3
) -> str:
    torch._dynamo.reset()
    torch.manual_seed(0)
    c = contender(variant, config, device, settings)
    x, y = synthetic_batch(config, settings.batch, device, 0)

    def step() -> None:
        contender_step(c, x, y)

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    trace = out / f"trace-{config.name}-{variant.replace('+', '_')}.json"
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    ) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    events = [
        e
        for e in json.loads(trace.read_text())["traceEvents"]
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    trace.unlink()  # large; the summary below is what is kept
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        by_kind[kind_of(e["name"])] += e["dur"] / 1000 / steps
        by_name[e["name"]][0] += e["dur"] / 1000 / steps
        by_name[e["name"]][1] += 1 / steps
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1000 / steps
    busy = sum(by_kind.values())
    lines = [
        f"profile {config.name} {variant} batch {settings.batch}: {span:.1f} ms/step span, {busy:.1f} ms kernels ({busy / span:.0%} busy)"
    ]
    lines += [
        f"  {kind:10s} {ms:7.2f} ms  {ms / busy:5.1%}" for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])
    ]
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
    parser.add_argument(
        "--floor", action="store_true", help="first time the step's products, attention and optimizer alone"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--out", default="/tmp/out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = PRESETS[args.preset]
    if args.floor:
        floor = step_floor(config, args.batch, device)
        (out / f"floor-{config.name}-b{args.batch}.json").write_text(json.dumps(floor, indent=1))
        print(
            f"floor {config.name} batch {args.batch}: " + ", ".join(f"{k} {v:.4g}" for k, v in floor.items()),
            flush=True,
        )
    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        name, _, batch = variant.partition("@")
        settings = BenchSettings(batch=int(batch or args.batch), steps=args.steps, timed_steps=args.timed_steps)
        kind = name if name.startswith("hf") else "onebox"
        set_inductor_knobs([])  # builder() sets its variant's own
        try:
            result = measure_training(kind, config, device, settings, None if kind != "onebox" else builder(name))
        except Exception as err:  # a probe reports a failing variant and goes on with the rest
            print(f"{config.name} {variant}: failed: {type(err).__name__}: {err}", flush=True)
            continue
        rows.append((variant, settings.batch, result))
        print(
            f"{config.name} {variant}: {json.dumps({k: v for k, v in result.items() if k not in ('loss_trace', 'estimate')})}",
            flush=True,
        )
    for variant in [v for v in args.profile.split(",") if v]:
        name, _, batch = variant.partition("@")
        text = profile(name, config, device, BenchSettings(batch=int(batch or args.batch)), out)
        print(text, flush=True)
        (out / f"profile-{config.name}-{variant.replace('+', '_').replace('@', '_b')}.txt").write_text(text)
    print(
        f"\n{'variant':28s} {'batch':>5s} {'ms/step':>8s} {'fwd':>6s} {'bwd':>6s} {'opt':>5s} {'tok/s':>9s} {'MFU':>6s} {'GB':>5s} {'tok/J':>6s} {'1st s':>6s} loss_end"
    )
    for variant, batch, r in rows:
        if r["status"] != "ok":
            print(f"{variant:28s} {batch:5d} {r['status']}")
            continue
        r = {
            k: float("nan") if v is None else v for k, v in r.items()
        }  # n/a (no NVML, no known peak on CPU) prints as nan
        tpj = r["tokens_per_joule"]
        print(
            f"{variant:28s} {batch:5d} {r['ms_per_step']:8.1f} {r['forward_ms']:6.1f} {r['backward_ms']:6.1f} {r['optimizer_ms']:5.1f} "
            f"{r['tokens_per_second']:9,.0f} {r['mfu']:6.1%} {r['peak_memory_bytes'] / 1e9:5.1f} {tpj:6.1f} {r['first_step_seconds']:6.1f} {r['loss_end']:.4f}"
        )


if __name__ == "__main__":
    main()
