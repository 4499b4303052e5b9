"""Memory strategies for training, their predicted GPU and host memory, and the planner that picks one.

A strategy is a combination of the transforms in `transforms.py` and `lowmem.py`, listed fastest
first (the order the planner tries them in); `onebox plan` prints every prediction for a preset on
this machine (or on a machine described by --gpu-memory / --host-memory), and training picks the
first strategy that fits unless told which one to use.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from onebox.config import ModelConfig
from onebox.errors import OneboxError
from onebox.memory import activation_bytes_per_token, estimate_training_memory

GPU_HEADROOM = (
    0.92  # of the card's memory: the allocator's fragmentation and the CUDA context (5b-A peaked at 94% of an H100)
)
HOST_HEADROOM = 0.8  # of host RAM: pinned pages, the process itself, the data loader


@dataclass(frozen=True)
class Strategy:
    """How training holds its memory."""

    name: str
    bf16_weights: bool  # bf16 weights updated with stochastic rounding, no fp32 master copy
    state_on_host: bool  # optimizer moments in pinned host memory (bf16 moments whenever weights are bf16)
    in_backward: bool  # update each block parameter in backward as its gradient completes
    checkpointing: bool  # recompute each block's activations in backward
    summary: str
    int8_moments: bool = False  # moments in 8 bits with blockwise scales (about 2 bytes per parameter for both)


STRATEGIES = (
    Strategy(
        "standard",
        False,
        False,
        False,
        False,
        "fp32 master weights, bf16 autocast, fused AdamW (Triton on CUDA), all activations kept",
    ),
    Strategy("checkpointed", False, False, False, True, "standard + activation checkpointing"),
    Strategy("bf16", True, False, True, False, "bf16 weights (stochastic rounding) and moments, update in backward"),
    Strategy("bf16-checkpointed", True, False, True, True, "bf16 + activation checkpointing"),
    Strategy(
        "offload",
        True,
        True,
        True,
        True,
        "bf16 + moments in pinned host memory streamed through the GPU + checkpointing",
    ),
    Strategy(
        "offload-int8",
        True,
        True,
        True,
        True,
        "offload with 8-bit moments (blockwise scales): half the host memory",
        int8_moments=True,
    ),
)
STRATEGY_NAMES = tuple(s.name for s in STRATEGIES)


def strategy(name: str) -> Strategy:
    """The strategy of that name, or a clear error."""
    for candidate in STRATEGIES:
        if candidate.name == name:
            return candidate
    raise OneboxError(
        f"unknown memory strategy {name!r}: use auto or one of {', '.join(STRATEGY_NAMES)} (see `onebox plan`)."
    )


@dataclass
class Prediction:
    """Predicted peak bytes of one training step under a strategy."""

    strategy: Strategy
    gpu: int  # on the accelerator (or in RAM when training on the CPU)
    host: int  # pinned host memory the strategy adds
    weights: int
    optimizer: int
    activations: int
    gradients: int


def predict(
    config: ModelConfig, batch: int, chosen: Strategy, compiled: bool = True, mixed: bool = True, shards: int = 1
) -> Prediction:
    """Predicted peak memory per device of one training step with AdamW under `chosen` (mixed: bf16
    autocast, as on a GPU). shards > 1: FSDP2 over that many processes, which divides weights,
    gradients and moments, while bf16 copies exist for two blocks at a time (one computing, one gathered ahead)."""
    if not chosen.bf16_weights:
        e = estimate_training_memory(config, batch, mixed, "adamw", chosen.checkpointing, compiled)
        if shards > 1:
            blocks = 2 * 2 * (config.num_params() - config.vocab_size * config.dim) // config.layers if mixed else 0
            e = dataclasses.replace(
                e,
                weights=e.weights // shards,
                gradients=e.gradients // shards,
                optimizer=e.optimizer // shards,
                low_precision_weights=min(e.low_precision_weights, blocks),
            )
        return Prediction(
            chosen, e.total, 0, e.weights + e.low_precision_weights, e.optimizer, e.activations, e.gradients
        )
    params = config.num_params()
    layer, loss = activation_bytes_per_token(
        config, True, compiled
    )  # bf16 weights: bf16 activations wherever the model runs
    per_token = (
        (4 * config.dim * config.layers + layer + loss) if chosen.checkpointing else config.layers * layer + loss
    )
    activations = batch * config.seq_len * per_token
    moments = (
        2 * params + 8 * -(-params // 256) if chosen.int8_moments else 4 * params
    )  # two 8-bit (+ fp32 scale per 256) or bf16 moments
    largest = max(config.dim * config.hidden, config.dim * config.dim, config.vocab_size * config.dim)
    # Gradients alive at once: the embedding and output layer (stepped after backward) and one block
    # parameter in its hook, plus that update's fp32 temporaries (gradient, two moments, weights, denominator).
    outside = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2) + config.dim
    gradients = 2 * outside + 2 * largest + 20 * largest
    weights = 2 * params
    if shards > 1:  # each process: its shards, two blocks gathered at a time, and one block's reduce-scatter
        block = (params - config.vocab_size * config.dim) // config.layers
        weights = weights // shards + 2 * 2 * block
        moments = moments // shards
        gradients = gradients // shards + block * (
            2 + 4 + 4 // shards
        )  # bf16 gradients, their fp32 copy reduced, the output
    on_gpu = 0 if chosen.state_on_host else moments
    return Prediction(
        chosen,
        weights + on_gpu + activations + gradients,
        moments if chosen.state_on_host else 0,
        weights,
        moments,
        activations,
        gradients,
    )


@dataclass
class MachineMemory:
    """What a plan is made against: bytes of accelerator memory and of host RAM."""

    gpu: int | None  # None: training on the CPU, where host RAM is the only memory
    host: int
    label: str


def machine_memory(device: torch.device) -> MachineMemory:
    """The memory of this machine for training on `device`."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return MachineMemory(props.total_memory, host, f"{props.name}, {props.total_memory / 1e9:.0f} GB")
    return MachineMemory(None, host, f"{device.type}, {host / 1e9:.0f} GB RAM")


def fits(p: Prediction, machine: MachineMemory, processes: int = 1) -> bool:
    """Whether a prediction (per process) fits the machine with headroom: each process has a GPU of its
    own, while all of them share the host."""
    if machine.gpu is None:  # on the CPU the moments "on the host" are in the same RAM
        return processes * (p.gpu + p.host) <= HOST_HEADROOM * machine.host
    return p.gpu <= GPU_HEADROOM * machine.gpu and processes * p.host <= HOST_HEADROOM * machine.host


def candidates(machine: MachineMemory, optimizer: str = "adamw", grad_accum: int = 1) -> list[Strategy]:
    """The strategies a run can use: bf16 ones step with onebox's AdamW inside backward (no Muon, no
    gradient accumulation); host offload needs an accelerator to offload from."""
    allowed = [s for s in STRATEGIES if machine.gpu is not None or not s.state_on_host]
    if optimizer != "adamw" or grad_accum > 1:
        allowed = [s for s in allowed if not s.bf16_weights]
    return allowed


def plan(
    config: ModelConfig,
    batch: int,
    machine: MachineMemory,
    compiled: bool = True,
    optimizer: str = "adamw",
    grad_accum: int = 1,
    mixed: bool = True,
    shards: int = 1,
) -> tuple[Strategy | None, list[Prediction]]:
    """Every usable strategy's prediction (per process, over `shards` FSDP2 processes on this machine),
    and the first (fastest) one that fits, or None."""
    predictions = [
        predict(config, batch, s, compiled, mixed, shards) for s in candidates(machine, optimizer, grad_accum)
    ]
    chosen = next((p.strategy for p in predictions if fits(p, machine, shards)), None)
    return chosen, predictions


def usable(chosen: Strategy, machine: MachineMemory, optimizer: str = "adamw", grad_accum: int = 1) -> Strategy:
    """`chosen` itself, or a clear error where it cannot run on this machine or with these settings."""
    if chosen not in candidates(machine, optimizer, grad_accum):
        raise OneboxError(
            f"the {chosen.name} memory strategy cannot run here: bf16 strategies step with onebox's own AdamW inside backward "
            f"(use --optimizer adamw and --grad-accum 1), and offload needs a GPU. Run `onebox plan` to see the usable ones."
        )
    return chosen


def units_of(reshard: bool) -> int:
    """Blocks per FSDP2 unit: two where the gathered weights are kept from forward to backward (every block
    is gathered by the end of forward anyway, so a larger unit costs no peak memory), one where they are
    resharded (a unit's gathered weights are what the lean plans budget for). Each unit costs the host its
    hooks, copy-in/copy-out and collective launches every step, and the 2-process step is bound by its
    host: 3b-A batch 8 on 2 x H200 issued a step in ~235 ms against ~185 ms of GPU work, and two blocks
    per unit gave 94.4% scaling against 80.1% with one (docs/perf/multi-gpu-h200x2-2026-11.md)."""
    return 1 if reshard else 2


def reshard_after_forward(
    config: ModelConfig,
    batch: int,
    chosen: Strategy,
    machine: MachineMemory,
    shards: int,
    compiled: bool = True,
    mixed: bool = True,
) -> bool:
    """Whether FSDP2 should free each block's gathered weights after forward and gather them again in
    backward (the lean choice), rather than keep them until backward: kept when every block's gathered
    copy fits beside the sharded prediction, which saves one all-gather of the model per step (3b-A on
    2 x H200: 94.6% scaling efficiency kept, 65-82% regathered)."""
    prediction = predict(config, batch, chosen, compiled, mixed, shards)
    gathered = (2 if mixed else 4) * (config.num_params() - config.vocab_size * config.dim)
    if machine.gpu is None:
        return prediction.gpu + gathered > HOST_HEADROOM * machine.host
    return prediction.gpu + gathered > GPU_HEADROOM * machine.gpu
