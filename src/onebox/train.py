"""The training loop: data, model, optimizer, schedule, evaluation, checkpoints, progress and metrics."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from onebox import __version__
from onebox.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    model_state,
    prune_checkpoints,
    save_checkpoint,
    sharded_folder,
)
from onebox.config import (
    ModelConfig,
    TrainConfig,
    apply_overrides,
    config_dict,
    model_config_from_dict,
    train_config_from_dict,
)
from onebox.data import (
    BatchLoader,
    DatasetInfo,
    dataset_info,
    prepare_default_corpus,
    read_shard,
)
from onebox.device import (
    autocast,
    autocast_dtype,
    format_bytes,
    peak_flops,
    peak_memory_bytes,
    pick_device,
    reset_peak_memory,
    synchronize,
)
from onebox.display import ProgressDisplay, plural
from onebox.distributed import (
    DistInfo,
    any_rank,
    barrier,
    init_distributed,
    load_full_state,
    load_sharded,
    mean_over_ranks,
    save_sharded,
    shutdown,
)
from onebox.errors import OneboxError
from onebox.export import load_hf
from onebox.files import is_disk_full
from onebox.host import collect_young, steady_collection
from onebox.memory import out_of_memory_message
from onebox.model import cross_entropy_loss
from onebox.optim import lr_factor
from onebox.plan import (
    HOST_HEADROOM,
    build_for_training,
    build_sharded_for_training,
    fits,
    machine_memory,
    predict,
    resolve_strategy,
    strategy,
)
from onebox.runs import (
    check_resume_target,
    disk_full_message,
    payload_bytes,
    remove_stale_temp_files,
    schedule_note,
    start_metrics,
    warmup_note,
)
from onebox.tokenizer import tokenizer_identity
from onebox.transforms import compile_scope, prepare_training

PRECISION_NAMES = {
    "auto": "bf16 autocast",
    "bf16": "bf16 autocast",
    "fp8": "fp8 block products + bf16 autocast",
    "fp32": "fp32",
}
STOP_CHECK_EVERY = 10  # steps between the processes' votes on stopping (Ctrl-C) under torchrun


class NonFiniteLoss(OneboxError):
    """Training produced a NaN or infinite loss."""


class Interrupted(OneboxError):
    """The user pressed Ctrl-C; a checkpoint was written."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reached."""

    out_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    checkpoint: Path | None
    tokens_per_second: float | None


def resume_configs(resume: str, train_overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig, Path]:
    """The configs saved in a checkpoint (a file or a run folder's latest), with train overrides applied; the
    run continues in the checkpoint's own folder (wherever it was first written), or in --out-dir."""
    payload = load_checkpoint(resume)
    model = model_config_from_dict(payload["model_config"])
    path = Path(payload["path"])
    train = apply_overrides(
        train_config_from_dict(payload["train_config"]), {"out_dir": str(path.parent), **train_overrides}
    ).validate()
    return model, train, path


def _rebatch(config: TrainConfig, saved_world: int, world: int, say: Any) -> TrainConfig:
    """Keep the sequences per optimizer step when a run resumes on another number of processes."""
    sequences = config.batch_size * saved_world
    if sequences % world:
        raise OneboxError(
            f"the run was saved with {sequences} sequences per step over {saved_world} processes; {world} processes cannot split "
            f"them evenly: resume on a number of processes that divides {sequences}."
        )
    say(
        f"the run was saved on {saved_world} process(es), resuming on {world}: {sequences // world} sequences per process keep {sequences} per step"
    )
    return apply_overrides(config, {"batch_size": sequences // world})


def _resumed_memory(setting: str, payload: dict[str, Any]) -> str:
    """The memory strategy a resumed run uses: the one asked for, or (auto) the one that wrote the
    checkpoint; refused where their optimizer state differs (torch's AdamW against onebox's own)."""
    saved = payload.get("memory", "standard")  # checkpoints from before this field held torch's AdamW state
    wanted = saved if setting == "auto" else setting
    if strategy(wanted).bf16_weights != strategy(saved).bf16_weights:
        raise OneboxError(
            f"{payload['path']} holds the optimizer state of the {saved} memory strategy, which {wanted} cannot continue "
            f"(torch's AdamW for standard and checkpointed, onebox's low-memory AdamW for the bf16 ones): resume with "
            f"--memory {saved}, or leave --memory at auto."
        )
    return wanted


def _load_optimizer(model: torch.nn.Module, optimizer: Any, states: Any) -> None:
    """Restore optimizer state saved by a single process (by index) or gathered from shards (by parameter name)."""
    groups = (
        states[0].get("param_groups", []) if isinstance(states, list) and states and isinstance(states[0], dict) else []
    )
    if groups and groups[0].get("params") and isinstance(groups[0]["params"][0], str):
        load_full_state(model, optimizer.optimizers, None, states)
    else:
        optimizer.load_state_dict(states)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def _memory_errors(model: ModelConfig, config: TrainConfig, mixed: bool, device: torch.device) -> Iterator[None]:
    """Turn out-of-memory failures into OneboxError carrying the estimate and the remedies."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise OneboxError(
            out_of_memory_message(
                model, config.batch_size, mixed, config.optimizer, config.activation_checkpointing, "GPU"
            )
        ) from None
    except RuntimeError as err:
        if "can't allocate memory" not in str(err) and "out of memory" not in str(err).lower():
            raise
        raise OneboxError(
            out_of_memory_message(
                model, config.batch_size, mixed, config.optimizer, config.activation_checkpointing, device.type
            )
        ) from None


@contextmanager
def _stop_on_sigint() -> Iterator[dict[str, bool]]:
    """First Ctrl-C asks the loop to stop after the current step; a second one interrupts at once."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _resolve_data(config: TrainConfig, say: Any) -> DatasetInfo:
    folder = Path(config.data).resolve() if config.data else prepare_default_corpus(progress=say)
    info = dataset_info(folder)
    say(
        f"data: {info.path}{'' if config.data else ', the default corpus'}: {plural(len(info.train_shards), 'train shard')}, "
        f"{plural(len(info.val_shards), 'validation shard')}"
    )
    return info


def _initial_model(source: str, model_config: ModelConfig) -> tuple[ModelConfig, dict[str, Any], str | None]:
    """The config, weights and tokenizer.json text to start from (--init-from): a Hugging Face folder, a onebox
    run folder or a checkpoint file; the context is the smaller of the run's seq_len and the model's."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        initial, state, tokenizer_json = load_hf(path)
    else:
        payload = load_checkpoint(path)
        initial, state, tokenizer_json = (
            model_config_from_dict(payload["model_config"]),
            model_state(payload),
            payload.get("tokenizer_json"),
        )
    return apply_overrides(initial, {"seq_len": min(model_config.seq_len, initial.seq_len)}), state, tokenizer_json


def _check_tokenizer(info: DatasetInfo, tokenizer_json: str | None, source: str, say: Any) -> None:
    """Refuse data tokenized with another tokenizer than the model's (--init-from): it would train on noise."""
    if tokenizer_json is None or info.tokenizer_path is None:
        which = "the model" if tokenizer_json is None else "the data"
        say(
            f"warning: {which} has no tokenizer.json, so whether the data was tokenized with the model's tokenizer cannot be checked"
        )
        return
    if tokenizer_identity(tokenizer_json) != tokenizer_identity(info.tokenizer_path.read_text()):
        raise OneboxError(
            f"the data in {info.path} was tokenized with another tokenizer than the model in {source}: training on it would start from "
            f"noise. Prepare the data with the model's tokenizer (onebox prepare INPUTS --out NEW_FOLDER --tokenizer "
            f"{Path(source) / 'tokenizer.json' if Path(source).is_dir() else 'TOKENIZER.json'}), then train on that folder."
        )


def _check_host_memory(
    model: ModelConfig, config: TrainConfig, chosen: Any, device: torch.device, compiled: bool, mixed: bool, world: int
) -> None:
    """On the CPU, refuse a plan that does not fit the host's RAM: the system would kill the run without a word."""
    machine = machine_memory(device)
    if machine.gpu is not None:
        return
    predicted = predict(model, config.batch_size, chosen, compiled, mixed, world)
    if not fits(predicted, machine, world):
        raise OneboxError(
            f"training {model.name} with the {chosen.name} memory strategy at batch {config.batch_size} is predicted to need "
            f"{world * (predicted.gpu + predicted.host) / 1e9:.1f} GB of RAM, more than the {HOST_HEADROOM * machine.host / 1e9:.1f} GB usable here "
            f"({HOST_HEADROOM:.0%} of {machine.host / 1e9:.0f} GB): the system would kill it. Use a smaller --batch-size or preset "
            f"(see onebox plan --preset {model.name} --batch {config.batch_size})."
        )


def _check_vocab(info: DatasetInfo, model: ModelConfig) -> None:
    vocab = info.vocab_size
    if vocab is None:  # a foreign folder without meta.json: look at the tokens themselves
        vocab = int(read_shard(info.train_shards[0]).max()) + 1
    if vocab > model.vocab_size:
        raise OneboxError(
            f"the data's tokenizer has {vocab} entries but the model's vocabulary has {model.vocab_size}: "
            f"set --vocab-size {math.ceil(vocab / 64) * 64} (or more), or prepare the data with a smaller tokenizer."
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: BatchLoader,
    batches: int,
    device: torch.device,
    dtype: torch.dtype | None,
    ranks: DistInfo | None = None,
) -> float:
    """Mean validation loss over the first `batches` batches of the (unshuffled) validation data (over all ranks' slices)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    loader.epoch, loader.cursor = 0, 0
    count = min(batches, loader.windows // (loader.batch * loader.world))
    for _ in range(count):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            total += cross_entropy_loss(model(x), y)
    model.train(was_training)
    return mean_over_ranks(total / count, ranks or DistInfo()).item()


def train(
    model_config: ModelConfig,
    config: TrainConfig,
    resume: str | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train (or resume) a model; returns what it reached. Raises OneboxError on bad input."""
    console = console or Console()
    model_config.validate()
    config.validate()
    ranks, device_setting = init_distributed(config.device)
    show_progress = show_progress and ranks.main

    def say(message: str) -> None:
        if ranks.main:  # one voice for the whole job
            console.print(message, highlight=False)

    try:
        return _train(model_config, config, resume, console, show_progress, ranks, pick_device(device_setting), say)
    finally:
        shutdown(ranks)


def _train(
    model_config: ModelConfig,
    config: TrainConfig,
    resume: str | None,
    console: Console,
    show_progress: bool,
    ranks: DistInfo,
    device: torch.device,
    say: Any,
) -> TrainResult:
    dtype = autocast_dtype(device, config.precision)
    info = _resolve_data(config, say)
    if config.data:  # stored resolved, so the run resumes from any working directory
        config = apply_overrides(config, {"data": str(info.path)})
    payload = load_checkpoint(resume) if resume else None
    init_state = None
    if config.init_from and payload is None:
        model_config, init_state, init_tokenizer = _initial_model(config.init_from, model_config)
        _check_tokenizer(info, init_tokenizer, config.init_from, say)
    _check_vocab(info, model_config)
    out_dir = Path(config.out_dir or f"runs/{model_config.name}")
    if payload is None and latest_checkpoint(out_dir) is not None:
        raise OneboxError(
            f"{out_dir} already holds the checkpoints of a run: continue it with `onebox train --resume {out_dir}`, "
            f"or start a new run with another --out-dir (or delete that folder)."
        )
    if payload is not None:
        if payload["step"] >= config.max_steps:
            say(
                f"the run in {Path(payload['path']).parent} is complete: {payload['path']} is step {payload['step']} of max_steps {config.max_steps}. "
                f"To train further, resume with a larger --max-steps (e.g. onebox train --resume {Path(payload['path']).parent} "
                f"--max-steps {2 * payload['step']})."
            )
            return TrainResult(
                out_dir, payload["step"], payload.get("train_loss"), None, None, Path(payload["path"]), None
            )
        check_resume_target(payload, out_dir, say)
        note = schedule_note(train_config_from_dict(payload["train_config"]), config, payload["step"])
        if note:
            say(note)
    note = warmup_note(config)
    if note:
        say(note)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out_dir, say)
        same_folder = payload is not None and out_dir.resolve() == Path(payload["path"]).parent.resolve()
        start_metrics(out_dir, payload["step"] if same_folder else None)
    if payload is not None and payload.get("world", 1) != ranks.world:
        config = _rebatch(config, payload.get("world", 1), ranks.world, say)
    tokenizer_json = info.tokenizer_path.read_text() if info.tokenizer_path else None

    compiled = compile_scope(config.compile, device) is not None
    sharded = payload is not None and bool(payload.get("sharded"))
    if ranks.active or sharded:  # planned for this many processes, or the one that wrote the checkpoint
        setting = _resumed_memory(config.memory, payload) if payload is not None else config.memory
        chosen = resolve_strategy(
            setting,
            model_config,
            config.batch_size,
            device,
            config.optimizer,
            config.grad_accum,
            compiled,
            dtype is not None,
            ranks.world,
        )
        if ranks.active and payload is not None and not sharded and chosen.bf16_weights:
            raise OneboxError(
                f"{payload['path']} was written by one process; the {chosen.name} strategy resumes on several processes only "
                f"from a checkpoint they wrote. Resume it in one process, or on several with --memory standard or checkpointed."
            )
    else:
        chosen = resolve_strategy(
            config.memory,
            model_config,
            config.batch_size,
            device,
            config.optimizer,
            config.grad_accum,
            compiled,
            dtype is not None,
        )
    _check_host_memory(model_config, config, chosen, device, compiled, dtype is not None, ranks.world)
    checkpointing = config.activation_checkpointing or chosen.checkpointing
    torch.manual_seed(config.seed)  # the same on every rank: every rank starts from the same weights
    state = payload["model"] if payload is not None and not sharded else init_state
    optimizer_states = payload["optimizer"] if payload is not None and not sharded else []
    reshard = True
    if ranks.active:
        model, loss_fn, optimizer, reshard = build_sharded_for_training(
            model_config, config, chosen, device, ranks.world, checkpointing
        )
        if sharded:
            load_sharded(sharded_folder(payload["path"]), model, optimizer)
        elif state is not None:
            load_full_state(
                model, getattr(optimizer, "optimizers", []), state, optimizer_states
            )  # the low-memory AdamW starts fresh (--init-from)
    else:
        model, optimizer = build_for_training(model_config, config, chosen, device, state)
        if sharded:
            load_sharded(sharded_folder(payload["path"]), model, optimizer)
        elif payload is not None:
            _load_optimizer(model, optimizer, optimizer_states)
        loss_fn = prepare_training(model, device, config.precision, config.compile, checkpointing)
    raw_model = model
    vocab = model_config.vocab_size
    loader = BatchLoader(
        info.train_shards,
        config.batch_size,
        model_config.seq_len,
        seed=config.seed,
        rank=ranks.rank,
        world=ranks.world,
        vocab_size=vocab,
    )
    val_loader = (
        BatchLoader(
            info.val_shards,
            config.batch_size,
            model_config.seq_len,
            shuffle=False,
            rank=ranks.rank,
            world=ranks.world,
            vocab_size=vocab,
            partial=True,
        )
        if info.val_shards
        else None
    )
    if val_loader is not None and val_loader.partial:
        say(
            f"the validation data holds {val_loader.windows} windows of {model_config.seq_len + 1} tokens, fewer than a batch of "
            f"{config.batch_size * ranks.world}: evaluating on those {val_loader.windows} alone"
        )
    start_step, tokens_seen = 0, 0
    if payload is not None:
        loader.load_state_dict(payload["data"])
        _set_rng_state(payload["rng"], device)
        start_step, tokens_seen = payload["step"], payload.get("tokens_seen", 0)

    resolved = {
        "model": config_dict(model_config),
        "train": {**config_dict(config), "out_dir": str(out_dir), "data": str(info.path)},
    }
    if ranks.main:
        (out_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    tokens_per_step = config.batch_size * config.grad_accum * model_config.seq_len * ranks.world
    peak = peak_flops(device)
    say(
        f"onebox {__version__} | {model_config.name}: {model_config.shape()} | {model_config.num_params() / 1e6:.2f}M params | device {device} | "
        f"precision {PRECISION_NAMES[config.precision] if dtype else 'fp32'} | memory {chosen.name}{' (planned)' if config.memory == 'auto' else ''} | {tokens_per_step} tokens/step | peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}"
    )
    say(f"config: {json.dumps(resolved['train'])}")
    if ranks.active:
        say(
            f"{ranks.world} processes (FSDP2): {config.batch_size} sequences per process x {config.grad_accum} accumulation x {ranks.world} = "
            f"{config.batch_size * config.grad_accum * ranks.world} sequences per optimizer step; the lr schedule counts optimizer steps; "
            f"{'each block regathered in backward' if reshard else 'gathered weights kept from forward to backward (they fit)'}"
        )

    def save(step: int, last_loss: float | None) -> Path:
        path = checkpoint_path(out_dir, step)
        if (
            ranks.active
        ):  # every rank writes its own shards to ckpt_N.dcp (into a temp folder, renamed when all are done)
            folder = sharded_folder(path)
            staging = folder.with_name(f".{folder.name}.tmp")
            if ranks.main:
                shutil.rmtree(staging, ignore_errors=True)
            barrier(ranks)
            save_sharded(staging, raw_model, optimizer)
            barrier(ranks)
            if ranks.main:
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(staging, folder)
            weights: dict[str, Any] = {"sharded": True}
        else:
            weights = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict()}
        if not ranks.main:
            barrier(ranks)
            return path
        path = save_checkpoint(  # last: a checkpoint exists once this small file does
            path,
            {
                "onebox_version": __version__,
                "world": ranks.world,
                "memory": chosen.name,
                "step": step,
                "tokens_seen": tokens_seen,
                **weights,
                "data": loader.state_dict(),
                "rng": _rng_state(device),
                "model_config": config_dict(model_config),
                "train_config": config_dict(config),
                "tokenizer_json": tokenizer_json,
                "train_loss": last_loss,
            },
        )
        prune_checkpoints(out_dir, config.keep_last, step)
        barrier(ranks)
        return path

    metrics_file = (out_dir / "metrics.jsonl").open("a") if ranks.main else None

    def record(entry: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    bytes_per_token = info.val_bytes_per_token
    display = ProgressDisplay(config.max_steps, start_step, console, enabled=show_progress)
    model.train()
    reset_peak_memory(device)
    window_loss = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    last_loss: float | None = None
    val_loss = val_bpb = None
    speed = None
    step = start_step
    last_checkpoint = latest_checkpoint(out_dir)

    def check_finite(loss: float, at_step: int) -> None:
        if not math.isfinite(loss):
            where = (
                f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
            )
            raise NonFiniteLoss(
                f"the loss became {loss} by step {at_step}; {where}. Lower --lr, raise --warmup-steps or "
                f"--grad-clip, and resume from that checkpoint with --resume."
            )

    try:
        with (
            _stop_on_sigint() as stop,
            _memory_errors(model_config, config, dtype is not None, device),
            steady_collection(),
        ):
            while step < config.max_steps:
                optimizer.set_lr_factor(lr_factor(step, config))
                for _ in range(config.grad_accum):
                    x, y = loader.next_batch()
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with autocast(device, dtype):
                        loss = loss_fn(x, y) / config.grad_accum
                    loss.backward()
                    window_loss += loss.detach()
                optimizer.step(config.grad_clip)
                optimizer.zero_grad()
                step += 1
                tokens_seen += tokens_per_step
                collect_young(step)
                window_steps += 1
                final = step == config.max_steps
                stopping = stop["stop"]
                if ranks.active:  # Ctrl-C reaches the ranks at different moments: they agree to stop at the same step;
                    # not every step, because the vote waits for the GPU and the host would lose its lead each time
                    voting = step % STOP_CHECK_EVERY == 0 or step % config.log_every == 0 or final
                    stopping = any_rank(stop["stop"], ranks) if voting else False
                if step % config.log_every == 0 or final or stopping:
                    synchronize(device)
                    elapsed = time.perf_counter() - window_start
                    last_loss = mean_over_ranks(window_loss / window_steps, ranks).item()
                    check_finite(last_loss, step)
                    speed = window_steps * tokens_per_step / elapsed
                    mfu = speed * model_config.flops_per_token() / peak if peak else None
                    memory = peak_memory_bytes(device)
                    lr = optimizer.param_groups[0]["lr"]
                    record(
                        {
                            "step": step,
                            "loss": last_loss,
                            "lr": lr,
                            "tokens_per_second": speed,
                            "mfu": mfu,
                            "peak_memory_bytes": memory,
                            "tokens_seen": tokens_seen,
                        }
                    )
                    display.update(
                        step,
                        f"loss {last_loss:.4f} | lr {lr:.2e} | {speed:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{mfu:.1%}'} | mem {format_bytes(memory)}",
                    )
                    window_loss.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                paused = time.perf_counter()  # evaluation and checkpoints do not count against tokens/s
                if val_loader is not None and ((config.eval_every and step % config.eval_every == 0) or final):
                    val_loss = evaluate(model, val_loader, config.eval_batches, device, dtype, ranks)
                    val_bpb = val_loss / math.log(2) / bytes_per_token if bytes_per_token else None
                    record({"step": step, "val_loss": val_loss, "val_bpb": val_bpb})
                    display.message(
                        f"step {step}: val loss {val_loss:.4f} | val bits/byte {'n/a' if val_bpb is None else f'{val_bpb:.3f}'}"
                    )
                if (config.ckpt_every and step % config.ckpt_every == 0) or final or stopping:
                    if window_steps:  # never save weights that came from a non-finite loss
                        check_finite(mean_over_ranks(window_loss / window_steps, ranks).item(), step)
                    try:
                        last_checkpoint = save(step, last_loss)
                    except Exception as err:
                        if not is_disk_full(err):
                            raise
                        needed = payload_bytes(raw_model.state_dict()) + payload_bytes(optimizer.state_dict())
                        raise OneboxError(disk_full_message(out_dir, step, needed, last_checkpoint)) from None
                window_start += time.perf_counter() - paused
                if stopping and not final:
                    raise Interrupted(
                        f"interrupted at step {step}; checkpoint saved to {last_checkpoint}. Continue with: onebox train --resume {out_dir}"
                    )
    finally:
        display.close()
        if metrics_file is not None:
            metrics_file.close()
    return TrainResult(out_dir, step, last_loss, val_loss, val_bpb, last_checkpoint, speed)
