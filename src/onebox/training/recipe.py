"""The one builder of a training run: strategy, model, transforms, optimizer, step, save and load.

`onebox train`, `bench validate` / `sweep`, `bench ceiling` and the probes in `benchmarks/` all build
through `choose_strategy` and `build`, so what is timed is what trains. The transforms are applied in
one fixed order, the one torchtitan's `parallelize` uses: fp8 matrix products, activation
checkpointing, compile, then FSDP2 over the processes. Several processes build the model on the meta
device and take memory only for their own shards, initialised as one process would from the same seed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from onebox.checkpoint import sharded_folder
from onebox.config import ModelConfig, TrainConfig
from onebox.device import autocast, autocast_dtype
from onebox.distributed import (
    DistInfo,
    barrier,
    init_sharded,
    load_full_state,
    load_sharded,
    save_sharded,
    shard_model,
)
from onebox.errors import OneboxError
from onebox.lora import adapter_state, apply_lora, load_adapters, spec_of
from onebox.lowmem import LowMemAdamW, keep_vectors_fp32
from onebox.model import Transformer, build_model
from onebox.optim import build_optimizer
from onebox.plan import (
    MachineMemory,
    Strategy,
    machine_memory,
    plan,
    reshard_after_forward,
    strategy,
    units_of,
    usable,
)
from onebox.runs import payload_bytes
from onebox.transforms import (
    LossFn,
    apply_activation_checkpointing,
    apply_float8,
    compile_scope,
    training_loss,
)


def choose_strategy(
    model: ModelConfig,
    train: TrainConfig,
    device: torch.device,
    world: int = 1,
    saved: dict[str, Any] | None = None,
    machine: MachineMemory | None = None,
) -> Strategy:
    """The memory strategy a run uses, decided once: the one `train.memory` names, or (auto) the planner's
    fastest that fits `world` processes on this machine (the leanest when none does: better to try it
    than refuse); a resumed run (`saved`: its checkpoint) keeps the strategy that wrote the checkpoint
    under auto and refuses one whose optimizer state differs."""
    setting = train.memory
    if train.lora_rank:  # the base is frozen (bf16 on a GPU) and only the adapters have optimizer state
        if setting not in ("auto", "standard", "checkpointed") or world > 1:
            raise OneboxError(
                f"LoRA trains in one process with --memory auto, standard or checkpointed (its base is frozen, so the "
                f"low-memory strategies have nothing to save); got --memory {setting} on {world} process(es)."
            )
        return strategy("standard" if setting == "auto" else setting)
    if saved is not None:
        written = saved.get("memory", "standard")
        setting = written if setting == "auto" else setting
        if strategy(setting).bf16_weights != strategy(written).bf16_weights:
            raise OneboxError(
                f"{saved['path']} holds the optimizer state of the {written} memory strategy, which {setting} cannot continue "
                f"(torch's AdamW for standard and checkpointed, onebox's low-memory AdamW for the bf16 ones): resume with "
                f"--memory {written}, or leave --memory at auto."
            )
    machine = machine or machine_memory(device)
    if setting == "auto":
        chosen, predictions = plan(
            model,
            train.batch_size,
            machine,
            compile_scope(train.compile, device) is not None,
            train.optimizer,
            train.grad_accum,
            autocast_dtype(device, train.precision) is not None,
            world,
        )
        chosen = chosen or predictions[-1].strategy
    else:
        chosen = usable(strategy(setting), machine, train.optimizer, train.grad_accum)
    if saved is not None and world > 1 and not saved.get("sharded") and chosen.bf16_weights:
        raise OneboxError(
            f"{saved['path']} was written by one process; the {chosen.name} strategy resumes on several processes only "
            f"from a checkpoint they wrote. Resume it in one process, or on several with --memory standard or checkpointed."
        )
    return chosen


def build_optimizer_for(model: Transformer, train: TrainConfig, chosen: Strategy) -> Any:
    """The strategy's optimizer over a model (sharded or not): onebox's low-memory AdamW for the bf16
    strategies, torch's otherwise."""
    if chosen.bf16_weights:
        moments: torch.dtype | str = "int8" if chosen.int8_moments else torch.bfloat16
        return LowMemAdamW(model, train, moments, chosen.state_on_host, chosen.in_backward)
    return build_optimizer(model, train)


def _no_mark() -> None:
    return None


@dataclass
class Recipe:
    """A built training run: the model (sharded or not), the loss it differentiates and its optimizer."""

    model: Transformer
    loss_fn: LossFn
    optimizer: Any
    strategy: Strategy
    device: torch.device
    dtype: torch.dtype | None  # autocast's dtype; None: fp32
    world: int = 1
    reshard: bool = True  # several processes: blocks regather their weights in backward
    compiled: bool = False
    lora: bool = False  # only the adapters train, and only they are saved

    def step(
        self,
        next_batch: Callable[[], tuple[Tensor, Tensor]],
        micro_batches: int = 1,
        clip: float = 1.0,
        mark: Callable[[], Any] = _no_mark,
    ) -> Tensor:
        """One optimizer step over `micro_batches` batches from `next_batch` (their gradients accumulated):
        forward under autocast, backward, update, zero the gradients; returns the mean loss (detached, not
        synced). `mark` is called at the start, after each forward, after each backward and after the update
        (phase timing)."""
        total = torch.zeros((), device=self.device)
        mark()
        for _ in range(micro_batches):
            x, y = next_batch()
            with autocast(self.device, self.dtype):
                loss = self.loss_fn(x, y) / micro_batches
            mark()
            loss.backward()
            mark()
            total += loss.detach()
        self.optimizer.step(clip)
        self.optimizer.zero_grad()
        mark()
        return total

    def set_lr_factor(self, factor: float) -> None:
        self.optimizer.set_lr_factor(factor)

    def weights(self, path: Path, ranks: DistInfo) -> dict[str, Any]:
        """The weights' part of the checkpoint at `path`: the state dicts in one process; with several, every
        process writes its own shards to ckpt_N.dcp (into a temporary folder renamed once all are done)."""
        if not ranks.active:
            state = adapter_state(self.model) if self.lora else self.model.state_dict()
            return {"model": state, "optimizer": self.optimizer.state_dict(), "lora": self.lora}
        folder = sharded_folder(path)
        staging = folder.with_name(f".{folder.name}.tmp")
        if ranks.main:
            shutil.rmtree(staging, ignore_errors=True)
        barrier(ranks)
        save_sharded(staging, self.model, self.optimizer)
        barrier(ranks)
        if ranks.main:
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
        return {"sharded": True}

    def state_bytes(self) -> int:
        """Bytes a checkpoint of this run's model and optimizer state holds (what a full disk was short of)."""
        state = adapter_state(self.model) if self.lora else self.model.state_dict()
        return payload_bytes(state) + payload_bytes(self.optimizer.state_dict())


def _load_optimizer(model: torch.nn.Module, optimizer: Any, states: Any) -> None:
    """Restore optimizer state saved by a single process (by index) or gathered from shards (by parameter name)."""
    groups = (
        states[0].get("param_groups", []) if isinstance(states, list) and states and isinstance(states[0], dict) else []
    )
    if groups and groups[0].get("params") and isinstance(groups[0]["params"][0], str):
        load_full_state(model, optimizer.optimizers, None, states)
    else:
        optimizer.load_state_dict(states)


def build(
    model_config: ModelConfig,
    train: TrainConfig,
    device: torch.device,
    chosen: Strategy,
    world: int = 1,
    state: dict[str, Tensor] | None = None,
    saved: dict[str, Any] | None = None,
    checkpointing: bool | None = None,
    reshard: bool | None = None,
    **shard_options: Any,
) -> Recipe:
    """Build the run: the model (fresh from the seed, from `state`'s weights, or from `saved`, a checkpoint
    to resume with its optimizer state) in the strategy's weight dtype, the transforms in their fixed order,
    FSDP2 over `world` processes (`reshard` None: as planned; `shard_options` go to `distributed.shard_model`,
    what benchmarks/scaling_probe.py varies), and the optimizer. With LoRA (train.lora_rank) `state` is the base
    model's, frozen (bf16 on a GPU), the adapters come fresh or from `saved`, and only they are optimised."""
    dtype = autocast_dtype(device, train.precision)
    scope = compile_scope(train.compile, device)
    sharded = world > 1
    from_shards = saved is not None and bool(saved.get("sharded"))
    spec = spec_of(train)
    if saved is not None and not from_shards and spec is None:
        state = saved["model"]
    weight_dtype = torch.bfloat16 if chosen.bf16_weights else torch.float32
    if spec is not None:  # a frozen base needs no fp32 master copy
        weight_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(model_config, "meta" if sharded else device, weight_dtype, None if sharded else state)
    if spec is not None:
        apply_lora(model, spec)
        model.to(device)
        if saved is not None:
            load_adapters(model, saved["model"])
    if chosen.bf16_weights:  # bf16 matrices, fp32 norm scales (kept whole on every process when sharded)
        keep_vectors_fp32(model, None if sharded else state)
    if train.precision == "fp8":
        apply_float8(model, device)
    if checkpointing is None:
        checkpointing = chosen.checkpointing or train.activation_checkpointing
    if checkpointing:
        apply_activation_checkpointing(model)
    loss_fn = training_loss(model, scope)
    if sharded:
        if reshard is None:
            reshard = reshard_after_forward(
                model_config,
                train.batch_size,
                chosen,
                machine_memory(device),
                world,
                scope is not None,
                dtype is not None,
            )
        if not shard_options.get("prefetch"):
            shard_options.setdefault("group", units_of(reshard))
        shard_model(
            model,
            dtype is not None,
            reshard_after_forward=reshard,
            replicate_vectors=chosen.bf16_weights,
            **shard_options,
        )
        model.to_empty(device=device)
        init_sharded(model)
    optimizer = build_optimizer_for(model, train, chosen)
    if from_shards:
        load_sharded(sharded_folder(saved["path"]), model, optimizer)
    elif sharded and state is not None:  # the low-memory AdamW starts fresh from --init-from weights
        load_full_state(model, getattr(optimizer, "optimizers", []), state, saved["optimizer"] if saved else [])
    elif saved is not None:
        _load_optimizer(model, optimizer, saved["optimizer"])
    reshard = True if reshard is None else reshard
    return Recipe(model, loss_fn, optimizer, chosen, device, dtype, world, reshard, scope is not None, spec is not None)
