"""Training on several processes with PyTorch's own engine: torchrun launches, torch.distributed
communicates (NCCL on GPUs, gloo on CPUs), FSDP2 (`fully_shard`) shards parameters, gradients and
optimizer state. Single-process runs never touch torch.distributed.

Checkpoints stay the ordinary onebox file: the full (unsharded) model and optimizer state, gathered
through torch.distributed.checkpoint's state-dict API and written by rank 0, so a run saved on N
processes resumes on any number (1 included), exports, and inspects like any other run.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from onebox.errors import OneboxError

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support: nothing is ever sharded

    class DTensor:  # type: ignore[no-redef]
        pass

    distribute_tensor = None  # type: ignore[assignment]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process logs and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_setting: str) -> tuple[DistInfo, str]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); return the info and the device to use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device_setting
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_setting != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise OneboxError(
                f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}. Launch at most that many processes."
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", device_id=torch.device("cuda", local_rank) if use_cuda else None
        )
    return DistInfo(rank, world, local_rank), f"cuda:{local_rank}" if use_cuda else "cpu"


def shard_model(
    model: torch.nn.Module,
    mixed: bool,
    reshard_after_forward: bool = True,
    keep_last: bool = True,
    reduce_dtype: torch.dtype = torch.float32,
    prefetch: int = 0,
    replicate_vectors: bool = False,
    group: int = 1,
) -> None:
    """FSDP2 over each block and then the whole model; bf16 compute with `reduce_dtype` gradient reduction when mixed.

    Each block's gathered parameters are freed after its forward (`reshard_after_forward`) and gathered
    again in backward, except the last block's with `keep_last`: backward needs them at once (torchtitan's
    default). `prefetch` > 0 issues the next blocks' all-gathers explicitly, that many ahead. `replicate_vectors`
    leaves the norm scales whole on every process (FSDP2's ignored_params), for the bf16 strategies, whose
    norm scales stay fp32 beside bf16 matrices (FSDP2 wants one dtype per unit): the low-memory AdamW
    averages their gradients itself at step() (one small all-reduce), and compiled blocks stay whole
    graphs (a norm in an FSDP2 unit of its own would cut them). `group` > 1 puts that many consecutive
    blocks in one FSDP2 unit: fewer, larger collectives and fewer hooks on the host, more memory gathered.

    The compiled training step calls `model.hidden_states` (then the head with the loss), not the
    model itself, so that method is registered with FSDP2: it gathers the root's parameters (the
    embedding) first, and the root keeps them gathered after forward, so the head reads them too.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # Block inputs are not cast (FSDP2 would round them to bf16): under autocast the residual stream stays
    # fp32 between blocks, as in one process (model.hidden_states).
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
        if mixed
        else MixedPrecisionPolicy()
    )
    blocks = list(model.layers)
    ignored = {p for p in model.parameters() if p.ndim < 2} if replicate_vectors else None
    if group > 1 and prefetch > 0:
        raise OneboxError("explicit prefetch is set per block: use it with one block per FSDP2 unit (group 1).")
    units = [blocks[i : i + group] for i in range(0, len(blocks), group)]
    for index, unit in enumerate(units):
        last = keep_last and index == len(units) - 1
        fully_shard(
            unit if len(unit) > 1 else unit[0],
            mp_policy=policy,
            reshard_after_forward=reshard_after_forward and not last,
            ignored_params=ignored,
        )
    fully_shard(model, mp_policy=policy, ignored_params=ignored)
    register_fsdp_forward_method(model, "hidden_states")
    if prefetch > 0:
        for index, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[index + 1 : index + 1 + prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, index - prefetch) : index][::-1])


@torch.no_grad()
def init_sharded(model: Any) -> None:
    """Initialise a model sharded by FSDP2 (after `to_empty`) as one process initialises it from the same
    seed: each parameter drawn whole, one at a time, and this process's part kept (`Transformer.init_parameter`)."""
    for name, param in model.named_parameters():
        if not isinstance(param, DTensor):
            model.init_parameter(name, param)
            continue
        full = torch.empty(param.shape, dtype=torch.float32, device=param.to_local().device)
        model.init_parameter(name, full)
        param.to_local().copy_(
            distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        )
    model.reset_rope()


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar over all processes (itself when alone)."""
    if not info.active:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world


def sum_over_ranks(value: float | None, info: DistInfo) -> float | None:
    """The sum of a per-rank reading over all ranks; None when any rank has none (a collective)."""
    if not info.active:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    both = torch.tensor(
        [0.0 if value is None else value, 1.0 if value is None else 0.0], device=device, dtype=torch.float64
    )
    dist.all_reduce(both, op=dist.ReduceOp.SUM)
    return None if both[1].item() > 0 else both[0].item()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is true on any (a collective: every rank must call it)."""
    if not info.active:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def load_full_state(
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    model_state: dict[str, Any] | None,
    optimizer_states: list[dict[str, Any]],
) -> None:
    """Load unsharded state (by parameter name) into a model, sharded or not, and its optimizers."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    if model_state is not None:
        set_model_state_dict(model, model_state, options=options)
    for opt, state in zip(optimizers, optimizer_states):
        set_optimizer_state_dict(model, opt, state, options=options)


def _optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer's part of a sharded checkpoint: torch optimizers' state by parameter name, or the
    low-memory AdamW's own sharded moments; nothing for None (the model only)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if optimizer is None:
        return {}
    if hasattr(optimizer, "sharded_state"):
        return {"lowmem": optimizer.sharded_state(model)}
    return {"optimizer": {str(i): get_optimizer_state_dict(model, opt) for i, opt in enumerate(optimizer.optimizers)}}


def save_sharded(folder: str | Path, model: torch.nn.Module, optimizer: Any) -> None:
    """Every process writes its own shards of the model and optimizer state (torch.distributed.checkpoint),
    so no process ever holds the whole: what a model too large for one host's memory needs. `optimizer`
    is an OptimizerSet, a LowMemAdamW, or None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save({"model": get_model_state_dict(model), **_optimizer_state(model, optimizer)}, checkpoint_id=str(folder))


def load_sharded(folder: str | Path, model: torch.nn.Module, optimizer: Any = None) -> None:
    """Load a sharded checkpoint into a model sharded over any number of processes, or not sharded at all
    (torch.distributed.checkpoint reshards as it reads), and into its optimizer (None: the model only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state: dict[str, Any] = {"model": get_model_state_dict(model), **_optimizer_state(model, optimizer)}
    with warnings.catch_warnings():  # in one process DCP says it reads "in a single process": that is the intent
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(
            state, checkpoint_id=str(folder)
        )  # train checks first that the strategy wrote this optimizer's state (_resumed_memory)
    set_model_state_dict(model, state["model"])
    if "lowmem" in state:
        optimizer.load_sharded_state(model, state["lowmem"])
    for i, opt in enumerate(getattr(optimizer, "optimizers", None) or []):
        set_optimizer_state_dict(model, opt, state["optimizer"][str(i)])


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.active and dist.is_initialized():
        dist.destroy_process_group()
