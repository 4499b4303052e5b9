"""Training-step benchmark on fixed synthetic tokens, for onebox's model and the transformers baseline.

One harness times both, so a comparison differs only in the model and its transforms: the same
tokens, batch, precision policy (fp32 weights, bf16 autocast on CUDA), loss, clipping and fused
AdamW. Phases are timed with CUDA events on GPU: forward (to the loss), backward, optimizer
(clip + step + zero_grad).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from onebox.bench.peers import transformers_model
from onebox.bench.timing import PhaseClock
from onebox.config import ModelConfig, TrainConfig
from onebox.device import (
    EnergyMeter,
    autocast_dtype,
    memory_kind,
    peak_flops,
    peak_memory_bytes,
    reset_peak_memory,
    synchronize,
)
from onebox.distributed import DistInfo, sum_over_ranks
from onebox.errors import OneboxError
from onebox.host import steady_collection
from onebox.memory import estimate_training_memory
from onebox.model import cross_entropy_loss
from onebox.plan import strategy
from onebox.training.recipe import Recipe, build, choose_strategy

BASELINES = ("hf", "hf-compile")


@dataclass
class BenchSettings:
    """How a training benchmark runs."""

    batch: int
    steps: int = 10  # untimed training steps on the fixed batch (compile happens in the first)
    timed_steps: int = 10
    precision: str = "auto"
    compile: str = "auto"
    lr: float = 3e-4
    seed: int = 0
    memory: str = "auto"  # the memory strategy (see onebox plan); auto = the planner's choice, as in training

    def validate(self) -> BenchSettings:
        """Refuse settings that cannot give a measurement."""
        if self.batch < 1 or self.steps < 2 or self.timed_steps < 1:
            raise OneboxError(
                "bench needs batch >= 1, steps >= 2 (the loss must be seen to fall) and timed steps >= 1."
            )
        return self


def run_config(settings: BenchSettings, device: torch.device) -> TrainConfig:
    """The training config a benchmark's settings stand for: what `onebox train` would be given."""
    return TrainConfig(
        lr=settings.lr,
        device=str(device),
        precision=settings.precision,
        compile=settings.compile,
        batch_size=settings.batch,
        memory=settings.memory,
        seed=settings.seed,
        warmup_steps=0,
    )


def build_onebox(config: ModelConfig, device: torch.device, settings: BenchSettings, **options: Any) -> Recipe:
    """onebox's training path as `onebox train` builds it (the recipe), over this process group's processes
    when there are several (`options`: the recipe's FSDP2 choices, what benchmarks/scaling_probe.py varies)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    train = run_config(settings, device)
    return build(config, train, device, choose_strategy(config, train, device, world), world, **options)


class _ClippedAdamW:
    """torch's fused AdamW stepped as transformers' Trainer steps it: clip the gradients' norm, step, zero."""

    def __init__(self, model: torch.nn.Module, lr: float, device: torch.device) -> None:
        self.params = list(model.parameters())
        self.adamw = torch.optim.AdamW(
            self.params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
        )

    def step(self, clip: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.adamw.step()

    def zero_grad(self) -> None:
        self.adamw.zero_grad()


def build_hf(config: ModelConfig, device: torch.device, settings: BenchSettings, compile_model: bool) -> Recipe:
    """transformers' model of the same family and shape (LlamaForCausalLM, Qwen3ForCausalLM, ...) with torch's
    fused AdamW (the baseline)."""
    model = transformers_model(config, device)
    model.train()
    forward = torch.compile(model) if compile_model else model
    return Recipe(
        model,
        lambda x, y: cross_entropy_loss(forward(input_ids=x, use_cache=False).logits, y),
        _ClippedAdamW(model, settings.lr, device),
        strategy("standard"),
        device,
        autocast_dtype(device, settings.precision),
        compiled=compile_model,
    )


def contender_step(contender: Recipe, x: torch.Tensor, y: torch.Tensor) -> None:
    """One untimed training step of a contender on a fixed batch: the probes' step."""
    contender.step(lambda: (x, y))


def synthetic_batch(
    config: ModelConfig, batch: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of uniform random tokens and their next-token targets."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), generator=generator)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _oom_result(config: ModelConfig, settings: BenchSettings, mixed: bool) -> dict[str, Any]:
    estimate = estimate_training_memory(config, settings.batch, mixed)
    fields = dict.fromkeys(
        (
            "ms_per_step",
            "forward_ms",
            "backward_ms",
            "optimizer_ms",
            "tokens_per_second",
            "mfu",
            "peak_memory_bytes",
            "avg_power_watts",
            "tokens_per_joule",
            "loss_start",
            "loss_end",
            "loss_delta",
        )
    )
    return {
        "status": "oom",
        **fields,
        "loss_trace": [],
        "flops_per_token": config.flops_per_token(),
        "peak_flops": None,
        "estimated_bytes": estimate.total,
        "estimate": asdict(estimate),
    }


Builder = Callable[[ModelConfig, torch.device, BenchSettings], Recipe]


def measure_training(
    kind: str,
    config: ModelConfig,
    device: torch.device,
    settings: BenchSettings,
    build: Builder | None = None,
    ranks: DistInfo | None = None,
) -> dict[str, Any]:
    """Build the contender ('onebox', 'hf', 'hf-compile', or `build` for a probe) and time it; out-of-memory gives status 'oom'."""
    settings.validate()
    dtype = autocast_dtype(device, settings.precision)
    # A sweep compiles many shapes in one process: without a reset, dynamo stops compiling after
    # its recompile limit (8) and later configurations silently run eagerly.
    torch._dynamo.reset()
    _release()
    reset_peak_memory(device)
    try:
        return _measure(kind, config, device, settings, build, ranks or DistInfo())
    except torch.cuda.OutOfMemoryError:
        pass  # leave the except block first so the traceback's tensors can be freed
    _release()
    return _oom_result(config, settings, dtype is not None)


def _measure(
    kind: str,
    config: ModelConfig,
    device: torch.device,
    settings: BenchSettings,
    build: Builder | None,
    ranks: DistInfo,
) -> dict[str, Any]:
    torch.manual_seed(settings.seed)
    if build is not None:
        contender = build(config, device, settings)
    elif kind == "onebox":
        contender = build_onebox(config, device, settings)
    elif kind in BASELINES:
        contender = build_hf(config, device, settings, compile_model=kind == "hf-compile")
    else:
        raise OneboxError(f"unknown contender {kind!r}: use onebox, {' or '.join(BASELINES)}.")
    x, y = synthetic_batch(config, settings.batch, device, settings.seed + ranks.rank)  # each rank its own rows
    clock = PhaseClock(device)
    losses: list[torch.Tensor] = []

    def step() -> list[Any]:
        marks: list[Any] = []
        losses.append(contender.step(lambda: (x, y), mark=lambda: marks.append(clock.mark())))
        return marks

    with steady_collection():  # no collector pauses inside the timed steps (nor one rank's while the other waits)
        started = time.perf_counter()
        step()
        synchronize(device)
        first_step_seconds = time.perf_counter() - started
        for _ in range(settings.steps - 1):
            step()
        meter = EnergyMeter(device)
        synchronize(device)
        meter.start()
        window_start = time.perf_counter()
        marks = [step() for _ in range(settings.timed_steps)]
        clock.finish()
        window = time.perf_counter() - window_start
    joules = sum_over_ranks(meter.joules(), ranks)  # every GPU's energy
    trace = [float(loss) for loss in losses]
    # The median step (the lower one of an even count) and its own phases: the phases then add up
    # to the total exactly, however noisy the host (separate medians per phase need not).
    steps = sorted(([clock.ms(m[i], m[i + 1]) for i in range(3)] for m in marks), key=sum)
    phases = steps[(len(steps) - 1) // 2]
    total = sum(phases)
    tokens = settings.batch * config.seq_len * ranks.world
    tokens_per_second = tokens * 1000.0 / total
    peak = peak_flops(device)
    fell = all(math.isfinite(v) for v in trace) and trace[-1] < trace[0]
    result = {
        "status": "ok" if fell else "failed",
        "ms_per_step": total,
        "forward_ms": phases[0],
        "backward_ms": phases[1],
        "optimizer_ms": phases[2],
        "tokens_per_second": tokens_per_second,
        "flops_per_token": config.flops_per_token(),
        "mfu": tokens_per_second * config.flops_per_token() / (peak * ranks.world) if peak else None,
        "peak_flops": peak,
        "peak_memory_bytes": peak_memory_bytes(device),
        "memory_kind": memory_kind(device),
        "avg_power_watts": joules / window if joules else None,
        "energy_joules": joules,
        "tokens_per_joule": tokens * settings.timed_steps / joules if joules else None,
        "loss_start": trace[0],
        "loss_end": trace[-1],
        "loss_delta": trace[-1] - trace[0],
        "loss_trace": trace,
        "first_step_seconds": first_step_seconds,
        "compiled": contender.compiled,
        "memory_strategy": contender.strategy.name,
        "processes": ranks.world,
    }
    return result
