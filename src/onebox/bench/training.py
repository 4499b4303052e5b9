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

from onebox.bench.timing import PhaseClock
from onebox.config import ModelConfig, TrainConfig
from onebox.device import (
    EnergyMeter,
    autocast,
    autocast_dtype,
    memory_kind,
    peak_flops,
    peak_memory_bytes,
    quiet_optional_imports,
    reset_peak_memory,
    synchronize,
)
from onebox.distributed import DistInfo, sum_over_ranks
from onebox.errors import OneboxError
from onebox.host import steady_collection
from onebox.memory import estimate_training_memory
from onebox.model import cross_entropy_loss
from onebox.plan import build_for_training, build_sharded_for_training, resolve_strategy
from onebox.transforms import compile_scope, prepare_training

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


@dataclass
class Contender:
    """A model under test: its parameters, a loss function and an optimizer."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    update: Callable[[], None]  # clip the gradients to norm 1, step, zero them
    compiled: bool
    strategy: str = "standard"  # the memory strategy; with updates in backward, "backward" includes the blocks' updates


def build_onebox(config: ModelConfig, device: torch.device, settings: BenchSettings) -> Contender:
    """onebox's training path: the model, its transforms and its optimizer, as `onebox train` builds them."""
    compiled = compile_scope(settings.compile, device) is not None
    mixed = autocast_dtype(device, settings.precision) is not None
    chosen = resolve_strategy(settings.memory, config, settings.batch, device, compiled=compiled, mixed=mixed)
    model, optimizer = build_for_training(config, TrainConfig(lr=settings.lr, device=str(device)), chosen, device)
    loss = prepare_training(model, device, settings.precision, settings.compile, chosen.checkpointing)

    def update() -> None:
        optimizer.step(max_grad_norm=1.0)
        optimizer.zero_grad()

    return Contender(loss, update, compiled, chosen.name)


def build_hf(config: ModelConfig, device: torch.device, settings: BenchSettings, compile_model: bool) -> Contender:
    """transformers' LlamaForCausalLM of the same shape with torch's fused AdamW (the baseline)."""
    quiet_optional_imports()
    try:
        import transformers
    except ImportError:
        raise OneboxError(
            "--baseline needs the transformers package: pip install transformers (or onebox[dev])."
        ) from None
    from onebox.export import hf_config

    hf = transformers.LlamaConfig(**hf_config(config, "float32", None))
    hf._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf)
    model.train()
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )

    def update() -> None:  # as transformers' Trainer does it
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return Contender(
        lambda x, y: cross_entropy_loss(forward(input_ids=x, use_cache=False).logits, y), update, compile_model
    )


def contender_step(
    contender: Contender, x: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> None:
    """One untimed training step of a contender (forward under autocast, backward, update): the probes' step."""
    with autocast(device, dtype):
        loss = contender.loss(x, y)
    loss.backward()
    contender.update()


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


Builder = Callable[[ModelConfig, torch.device, BenchSettings], Contender]


def build_sharded(
    config: ModelConfig,
    device: torch.device,
    settings: BenchSettings,
    reshard: bool | None = None,
    **shard_options: Any,
) -> Contender:
    """onebox's multi-process path, as `onebox train` under torchrun builds it (plan.build_sharded_for_training;
    `reshard` None: as planned; it and `shard_options` are what benchmarks/scaling_probe.py varies)."""
    compiled = compile_scope(settings.compile, device) is not None
    mixed = autocast_dtype(device, settings.precision) is not None
    world = torch.distributed.get_world_size()
    chosen = resolve_strategy(
        settings.memory, config, settings.batch, device, compiled=compiled, mixed=mixed, shards=world
    )
    train = TrainConfig(
        lr=settings.lr,
        device=str(device),
        precision=settings.precision,
        compile=settings.compile,
        batch_size=settings.batch,
    )
    _, loss, optimizer, _ = build_sharded_for_training(
        config, train, chosen, device, world, reshard=reshard, **shard_options
    )

    def update() -> None:
        optimizer.step(max_grad_norm=1.0)
        optimizer.zero_grad()

    return Contender(loss, update, compiled, chosen.name)


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
        return _measure(
            kind,
            config,
            device,
            settings,
            dtype,
            build or (build_sharded if ranks is not None and ranks.active else None),
            ranks or DistInfo(),
        )
    except torch.cuda.OutOfMemoryError:
        pass  # leave the except block first so the traceback's tensors can be freed
    _release()
    return _oom_result(config, settings, dtype is not None)


def _measure(
    kind: str,
    config: ModelConfig,
    device: torch.device,
    settings: BenchSettings,
    dtype: torch.dtype | None,
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

    def step() -> tuple[Any, Any, Any, Any]:
        start = clock.mark()
        with autocast(device, dtype):
            loss = contender.loss(x, y)
        after_forward = clock.mark()
        loss.backward()
        after_backward = clock.mark()
        contender.update()
        end = clock.mark()
        losses.append(loss.detach())
        return start, after_forward, after_backward, end

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
        "memory_strategy": contender.strategy,
        "processes": ranks.world,
    }
    return result
