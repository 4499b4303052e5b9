"""`onebox bench ceiling`: the largest model this machine trains, rung by rung up the ladder.

Each rung plans its memory strategy (or uses the one given), builds the model straight in its
weight dtype, trains `steps` steps on one fixed batch of synthetic tokens (the loss must fall) and
records ms/step, tokens/s, measured peak GPU memory, the process's peak host memory and the
planner's predictions beside them. On a GPU each rung runs in a fresh process, so nothing one rung
leaves behind (cached graphs, fragmented or registered memory) shrinks the next, its host peak is its
own, and a rung the kernel kills for host memory is recorded as out of memory. When the planned
strategy runs out of memory anyway, the next leaner one that the planner says fits is tried. The
climb stops at the first rung that no strategy fits.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import json
import math
import multiprocessing
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from onebox.bench.schema import config_record, new_document
from onebox.bench.training import synthetic_batch
from onebox.config import TrainConfig, config_dict
from onebox.device import (
    autocast_dtype,
    cap_gpu_memory,
    format_bytes,
    memory_kind,
    peak_memory_bytes,
    reset_peak_memory,
    synchronize,
)
from onebox.errors import OneboxError
from onebox.plan import STRATEGIES, MachineMemory, Strategy, fits, machine_memory, plan, predict
from onebox.presets import LADDER, SHARDED_LADDER, preset
from onebox.training.recipe import Recipe, build, choose_strategy
from onebox.transforms import compile_scope

Say = Callable[[str], None]


def host_peak_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB); it includes pinned pages."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_steps(
    recipe: Recipe, x: torch.Tensor, y: torch.Tensor, steps: int, reported: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[list[float], list[float]]:
    """`steps` steps on one fixed batch: the losses (as `reported` gives them) and each step's ms; reading
    the loss syncs, so every step is timed whole."""
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(reported(recipe.step(lambda: (x, y))).item())
        synchronize(recipe.device)
        times.append((time.perf_counter() - start) * 1000.0)
    return losses, times


def _rung_config(batch: int, lr: float, device: torch.device) -> TrainConfig:
    """A rung trains as `onebox train` would with these settings: bf16 autocast and compile where they apply."""
    return TrainConfig(lr=lr, device=str(device), warmup_steps=0, batch_size=batch)


def climb(
    config: Any, chosen: Strategy, device: torch.device, batch: int, steps: int, lr: float, gpu_limit: int | None = None
) -> dict[str, Any]:
    """Train one rung for `steps` steps (within `gpu_limit` bytes of the GPU when given); status 'ok',
    'failed' (the loss did not fall) or 'oom'."""
    cap_gpu_memory(device, gpu_limit)
    torch._dynamo.reset()
    _release()
    reset_peak_memory(device)
    try:
        recipe = build(config, _rung_config(batch, lr, device), device, chosen)
        x, y = synthetic_batch(config, batch, device, seed=0)
        losses, times = _train_steps(recipe, x, y, steps, lambda loss: loss)
        peak = peak_memory_bytes(device)
        del recipe, x, y
    except torch.cuda.OutOfMemoryError:
        return {"status": "oom"}
    except RuntimeError as err:  # pinned host memory that cannot be had
        if "out of memory" not in str(err).lower() and "can't allocate" not in str(err):
            raise
        return {"status": "oom", "error": str(err).splitlines()[0]}
    finally:
        _release()
    return {
        **_result(config, batch, losses, times),
        "peak_memory_bytes": peak,
        "memory_kind": memory_kind(device),
        "host_peak_bytes": host_peak_bytes(),
    }


def _result(config: Any, sequences: int, losses: list[float], times: list[float]) -> dict[str, Any]:
    """Status (the loss must fall), median ms/step after the compiling steps, tokens/s of `sequences` per step, the loss trace."""
    ms = statistics.median(times[2:] if len(times) > 3 else times)
    fell = all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    return {
        "status": "ok" if fell else "failed",
        "ms_per_step": ms,
        "step_ms": times,
        "tokens_per_second": sequences * config.seq_len * 1000.0 / ms,
        "loss_trace": losses,
        "loss_start": losses[0],
        "loss_end": losses[-1],
    }


def climb_sharded(
    config: Any,
    chosen: Strategy,
    device_setting: str,
    batch: int,
    steps: int,
    lr: float,
    out: str,
    gpu_limit: int | None = None,
) -> int:
    """One process of `bench ceiling --gpus N` under torchrun: the rung is built on the meta device and
    sharded with FSDP2 before any memory is taken, then each process trains on its own fixed batch;
    rank 0 writes the result (the largest peak of any process) to `out`. A process that runs out of
    memory leaves `out`.oom<rank> behind and stops, and torchrun stops the others."""
    from onebox.device import pick_device
    from onebox.distributed import init_distributed, mean_over_ranks, shutdown

    ranks, device_name = init_distributed(device_setting)
    device = pick_device(device_name)
    try:
        cap_gpu_memory(device, gpu_limit)
        reset_peak_memory(device)
        try:
            recipe = build(config, _rung_config(batch, lr, device), device, chosen, ranks.world, reshard=True)  # lean
            x, y = synthetic_batch(config, batch, device, seed=ranks.rank)
            losses, times = _train_steps(recipe, x, y, steps, lambda loss: mean_over_ranks(loss, ranks))
        except torch.cuda.OutOfMemoryError:
            Path(f"{out}.oom{ranks.rank}").write_text("out of memory")
            raise
        peaks = torch.tensor(
            [float(peak_memory_bytes(device)), float(host_peak_bytes())],
            device=device if device.type == "cuda" else "cpu",
        )
        if ranks.active:
            torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
        if ranks.main:
            result = _result(config, batch * ranks.world, losses, times)
            result.update(
                peak_memory_bytes=int(peaks[0].item()), host_peak_bytes=int(peaks[1].item()), processes=ranks.world
            )
            Path(out).write_text(json.dumps(result))
    finally:
        shutdown(ranks)
    return 0


def _climb_processes(
    config: Any,
    chosen: Strategy,
    processes: int,
    device: str,
    batch: int,
    steps: int,
    lr: float,
    gpu_limit: int | None,
) -> dict[str, Any]:
    """Run one rung on `processes` processes (torchrun + FSDP2: `onebox.bench.workers ceiling`)."""
    from onebox.launch import run_job

    spec = {
        "model": config_dict(config),
        "strategy": chosen.name,
        "device": device,
        "batch": batch,
        "steps": steps,
        "lr": lr,
        "gpu_limit": gpu_limit,
    }
    with tempfile.TemporaryDirectory() as folder:
        code, out = run_job(processes, "onebox.bench.workers", "ceiling", spec, Path(folder))
        if any(Path(folder).glob(f"{out.name}.oom*")):
            return {"status": "oom", "error": "a process ran out of device memory"}
        if code != 0 or not out.is_file():
            raise OneboxError(f"the {processes}-process run of {config.name} failed (its error is printed above).")
        return json.loads(out.read_text())


def climb_isolated(
    config: Any, chosen: Strategy, device: torch.device, batch: int, steps: int, lr: float, gpu_limit: int | None = None
) -> dict[str, Any]:
    """climb() in a fresh process on a GPU (in this one on the CPU, where tests run it)."""
    if device.type != "cuda":
        return climb(config, chosen, device, batch, steps, lr)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(climb, config, chosen, device, batch, steps, lr, gpu_limit).result()
        except concurrent.futures.process.BrokenProcessPool:
            return {"status": "oom", "error": "the rung's process was killed (host memory ran out)"}


def run_ceiling(
    names: list[str] | None,
    device: torch.device,
    say: Say,
    batch: int = 1,
    steps: int = 10,
    memory: str = "auto",
    lr: float = 3e-4,
    processes: int = 1,
    device_setting: str | None = None,
    gpu_limit: int | None = None,
) -> dict[str, Any]:
    """The `ceiling` document: one entry per rung climbed, the last being the first that did not fit.
    processes > 1: each rung on that many processes (torchrun + FSDP2, `batch` sequences each; an entry's
    batch is then all processes' sequences per step), each process given `device_setting` (the --device asked for; default: `device`).
    gpu_limit: plan and train within this many bytes of each GPU (a smaller card's ceiling on a larger one)."""
    names = names or list(LADDER if processes == 1 else SHARDED_LADDER)
    configs = [preset(n) for n in names]  # unknown names fail before anything runs
    machine = machine_memory(device)
    if gpu_limit is not None:
        if machine.gpu is None:
            raise OneboxError(
                f"--gpu-memory limits each GPU, but this ceiling runs on {device.type}: leave it out there, or run on a GPU."
            )
        if gpu_limit > machine.gpu:
            raise OneboxError(
                f"--gpu-memory {gpu_limit / 1e9:g} GB is more than this GPU has ({machine.gpu / 1e9:.0f} GB): "
                "give a limit at or below it, or leave it out to use the whole GPU."
            )
        machine = MachineMemory(gpu_limit, machine.host, f"{machine.label}, limited to {gpu_limit / 1e9:g} GB")
    compiled = compile_scope("auto", device) is not None
    mixed = autocast_dtype(device, "auto") is not None
    doc = new_document(
        "ceiling",
        device,
        {
            "batch": batch,
            "steps": steps,
            "memory": memory,
            "lr": lr,
            "ladder": names,
            "tokens": "fixed synthetic batch",
            "processes": processes,
            "gpu_memory_limit_bytes": gpu_limit,
        },
    )
    for config in configs:
        fallbacks: list[Strategy] = []
        if memory == "auto":  # the planner's choice, the leaner ones that also fit, the leanest one's numbers
            chosen, predictions = plan(config, batch, machine, compiled, mixed=mixed, shards=processes)
            fallbacks = [p.strategy for p in predictions if fits(p, machine, processes)][1:]
            leanest = predictions[-1]
        else:
            train = dataclasses.replace(_rung_config(batch, lr, device), memory=memory)
            chosen = choose_strategy(config, train, device, processes, machine=machine)
        if chosen is None:  # no strategy fits by the planner's arithmetic: the leanest one's numbers say why
            doc["entries"].append(
                {
                    "config": config_record(config),
                    "batch": batch * processes,
                    "strategy": leanest.strategy.name,
                    "predicted": {"gpu_bytes": leanest.gpu, "host_bytes": leanest.host},
                    "result": {"status": "does not fit"},
                }
            )
            say(
                f"{config.name:<5} {config.num_params() / 1e9:5.1f}B  does not fit: the leanest strategy ({leanest.strategy.name}) needs "
                f"{format_bytes(leanest.gpu)} on the device and {format_bytes(leanest.host)} of host memory"
            )
            break
        attempts: list[dict[str, Any]] = []
        for option in [chosen] + [f for f in fallbacks if STRATEGIES.index(f) > STRATEGIES.index(chosen)]:
            predicted = predict(config, batch, option, compiled, mixed, processes)
            say(
                f"{config.name:<5} {config.num_params() / 1e9:5.1f}B  {option.name}: predicted {format_bytes(predicted.gpu)} device, "
                f"{format_bytes(predicted.host)} host{'' if fits(predicted, machine, processes) else ' (over the planner limit)'}"
                f"{f' per process x {processes}' if processes > 1 else ''}; training {steps} steps ..."
            )
            if processes > 1:
                result = _climb_processes(
                    config, option, processes, device_setting or str(device), batch, steps, lr, gpu_limit
                )
            else:
                result = climb_isolated(config, option, device, batch, steps, lr, gpu_limit)
            attempts.append(
                {
                    "strategy": option.name,
                    "status": result["status"],
                    **({"error": result["error"]} if "error" in result else {}),
                }
            )
            if result["status"] != "oom":
                break
            say(
                f"{config.name:<5} {option.name}: out of memory{' (' + result['error'] + ')' if 'error' in result else ''}"
            )
        doc["entries"].append(
            {
                "config": config_record(config),
                "batch": batch * processes,
                "strategy": option.name,
                "attempts": attempts,
                "predicted": {"gpu_bytes": predicted.gpu, "host_bytes": predicted.host},
                "result": result,
            }
        )
        if result["status"] == "oom":
            say(f"{config.name:<5} out of memory with every strategy tried: the training ceiling is the rung below")
            break
        say(
            f"{config.name:<5} {result['status']}: {result['ms_per_step']:,.0f} ms/step | {result['tokens_per_second']:,.0f} tok/s | "
            f"device peak {format_bytes(result['peak_memory_bytes'])} | host peak {format_bytes(result['host_peak_bytes'])} | "
            f"loss {result['loss_start']:.3f} -> {result['loss_end']:.3f}"
        )
    return doc
