"""The training loop: one optimizer step after another, with logging, evaluation, checkpoints and stopping.

`train()` starts the processes' group (one process, or many under torchrun), checks what the run starts
from (`start`), builds it (`recipe`) and runs `Trainer.run`, whose loop reads top to bottom; one process
or many differ only in what the recipe built and in the ranks' vote on stopping.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from onebox import __version__
from onebox.checkpoint import checkpoint_path, latest_checkpoint, prune_checkpoints, save_checkpoint
from onebox.config import ModelConfig, TrainConfig, config_dict
from onebox.data import BatchLoader, make_loader
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
from onebox.display import ProgressDisplay
from onebox.distributed import DistInfo, any_rank, barrier, init_distributed, mean_over_ranks, shutdown
from onebox.errors import OneboxError
from onebox.files import is_disk_full
from onebox.host import collect_young, steady_collection
from onebox.model import cross_entropy_loss
from onebox.optim import lr_factor
from onebox.runs import disk_full_message
from onebox.training.guards import memory_errors, stop_on_sigint
from onebox.training.recipe import build, choose_strategy
from onebox.training.start import Start, check_host_memory, start
from onebox.transforms import compile_scope

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


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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


class Trainer:
    """One run built and ready: `run()` trains it to max_steps (or until Ctrl-C)."""

    def __init__(self, begin: Start, ranks: DistInfo, device: torch.device, console: Console, show_progress: bool):
        self.model_config, self.config, self.out_dir = begin.model, begin.train, begin.out_dir
        self.data, self.saved, self.tokenizer_json = begin.data, begin.saved, begin.tokenizer_json
        self.ranks, self.device, self.console = ranks, device, console
        config, model_config = self.config, self.model_config
        chosen = choose_strategy(model_config, config, device, ranks.world, self.saved)
        compiled = compile_scope(config.compile, device) is not None
        check_host_memory(
            model_config,
            config,
            chosen,
            device,
            compiled,
            autocast_dtype(device, config.precision) is not None,
            ranks.world,
        )
        torch.manual_seed(config.seed)  # the same on every rank: every rank starts from the same weights
        self.recipe = build(model_config, config, device, chosen, ranks.world, state=begin.state, saved=self.saved)
        loaders = {"seq_len": model_config.seq_len, "rank": ranks.rank, "world": ranks.world}
        vocab = model_config.vocab_size
        data = begin.data
        self.loader = make_loader(
            data.path, "train", data.train_shards, config.batch_size, seed=config.seed, vocab_size=vocab, **loaders
        )
        self.val_loader = None
        if data.val_shards:
            self.val_loader = make_loader(
                data.path,
                "val",
                data.val_shards,
                config.batch_size,
                shuffle=False,
                vocab_size=vocab,
                partial=True,
                **loaders,
            )
        self.step, self.tokens_seen = begin.step, 0
        if self.saved is not None:
            self.loader.load_state_dict(self.saved["data"])
            _set_rng_state(self.saved["rng"], device)
            self.tokens_seen = self.saved.get("tokens_seen", 0)
        self.tokens_per_step = config.batch_size * config.grad_accum * model_config.seq_len * ranks.world
        self.peak = peak_flops(device)
        self.display = ProgressDisplay(config.max_steps, self.step, console, enabled=show_progress)
        self.metrics = (self.out_dir / "metrics.jsonl").open("a") if ranks.main else None
        self.last_checkpoint = latest_checkpoint(self.out_dir)
        self.last_loss = self.val_loss = self.val_bpb = self.speed = None
        self.window_loss = torch.zeros((), device=device)
        self.window_steps, self.window_start = 0, time.perf_counter()

    def say(self, message: str) -> None:
        if self.ranks.main:  # one voice for the whole job
            self.console.print(message, highlight=False)

    def announce(self) -> None:
        """The run's header: what trains, on what, how; the resolved config is written beside the checkpoints."""
        config, model_config, ranks = self.config, self.model_config, self.ranks
        if self.val_loader is not None and self.val_loader.partial:
            self.say(
                f"the validation data holds {self.val_loader.windows} windows of {model_config.seq_len + 1} tokens, fewer than a batch of "
                f"{config.batch_size * ranks.world}: evaluating on those {self.val_loader.windows} alone"
            )
        resolved = {
            "model": config_dict(model_config),
            "train": {**config_dict(config), "out_dir": str(self.out_dir), "data": str(self.data.path)},
        }
        if ranks.main:
            (self.out_dir / "config.json").write_text(json.dumps(resolved, indent=2))
        precision = PRECISION_NAMES[config.precision] if self.recipe.dtype else "fp32"
        planned = " (planned)" if config.memory == "auto" else ""
        peak = "n/a" if self.peak is None else f"{self.peak / 1e12:.0f} TFLOP/s"
        self.say(
            f"onebox {__version__} | {model_config.name}: {model_config.shape()} | {model_config.num_params() / 1e6:.2f}M params | "
            f"device {self.device} | precision {precision} | memory {self.recipe.strategy.name}{planned} | "
            f"{self.tokens_per_step} tokens/step | peak {peak}"
        )
        self.say(f"config: {json.dumps(resolved['train'])}")
        if ranks.active:
            self.say(
                f"{ranks.world} processes (FSDP2): {config.batch_size} sequences per process x {config.grad_accum} accumulation x "
                f"{ranks.world} = {config.batch_size * config.grad_accum * ranks.world} sequences per optimizer step; the lr schedule "
                f"counts optimizer steps; {'each block regathered in backward' if self.recipe.reshard else 'gathered weights kept from forward to backward (they fit)'}"
            )

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next_batch()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def run(self) -> TrainResult:
        config = self.config
        self.announce()
        self.recipe.model.train()
        reset_peak_memory(self.device)
        try:
            with (
                stop_on_sigint() as stop,
                memory_errors(self.model_config, config, self.recipe.dtype is not None, self.device),
                steady_collection(),
            ):
                while self.step < config.max_steps:
                    self.recipe.set_lr_factor(lr_factor(self.step, config))
                    self.window_loss += self.recipe.step(self.next_batch, config.grad_accum, config.grad_clip)
                    self.step += 1
                    self.tokens_seen += self.tokens_per_step
                    self.window_steps += 1
                    collect_young(self.step)
                    final = self.step == config.max_steps
                    stopping = self.stopping(stop["stop"], final)
                    if self.step % config.log_every == 0 or final or stopping:
                        self.log()
                    paused = time.perf_counter()  # evaluation and checkpoints do not count against tokens/s
                    if self.val_loader is not None and (
                        (config.eval_every and self.step % config.eval_every == 0) or final
                    ):
                        self.evaluate()
                    if (config.ckpt_every and self.step % config.ckpt_every == 0) or final or stopping:
                        self.checkpoint()
                    self.window_start += time.perf_counter() - paused
                    if stopping and not final:
                        raise Interrupted(
                            f"interrupted at step {self.step}; checkpoint saved to {self.last_checkpoint}. "
                            f"Continue with: onebox train --resume {self.out_dir}"
                        )
        finally:
            self.display.close()
            if self.metrics is not None:
                self.metrics.close()
        return TrainResult(
            self.out_dir, self.step, self.last_loss, self.val_loss, self.val_bpb, self.last_checkpoint, self.speed
        )

    def stopping(self, asked: bool, final: bool) -> bool:
        """Whether to stop after this step (Ctrl-C). It reaches the processes at different moments, so they
        vote and stop at the same step; not every step, because the vote waits for the GPU and the host
        would lose its lead each time."""
        if not self.ranks.active:
            return asked
        voting = self.step % STOP_CHECK_EVERY == 0 or self.step % self.config.log_every == 0 or final
        return any_rank(asked, self.ranks) if voting else False

    def record(self, entry: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(entry) + "\n")
            self.metrics.flush()

    def check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            where = (
                f"the last good checkpoint is {self.last_checkpoint}"
                if self.last_checkpoint
                else "no checkpoint was written yet"
            )
            raise NonFiniteLoss(
                f"the loss became {loss} by step {self.step}; {where}. Lower --lr, raise --warmup-steps or "
                f"--grad-clip, and resume from that checkpoint with --resume."
            )

    def window_mean(self) -> float:
        return mean_over_ranks(self.window_loss / self.window_steps, self.ranks).item()

    def log(self) -> None:
        """The mean loss, speed and memory since the last log line, to the display and metrics.jsonl."""
        synchronize(self.device)
        elapsed = time.perf_counter() - self.window_start
        self.last_loss = self.window_mean()
        self.check_finite(self.last_loss)
        self.speed = self.window_steps * self.tokens_per_step / elapsed
        mfu = self.speed * self.model_config.flops_per_token() / self.peak if self.peak else None
        memory = peak_memory_bytes(self.device)
        lr = self.recipe.optimizer.param_groups[0]["lr"]
        self.record(
            {
                "step": self.step,
                "loss": self.last_loss,
                "lr": lr,
                "tokens_per_second": self.speed,
                "mfu": mfu,
                "peak_memory_bytes": memory,
                "tokens_seen": self.tokens_seen,
            }
        )
        self.display.update(
            self.step,
            f"loss {self.last_loss:.4f} | lr {lr:.2e} | {self.speed:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{mfu:.1%}'} | "
            f"mem {format_bytes(memory)}",
        )
        self.window_loss.zero_()
        self.window_steps, self.window_start = 0, time.perf_counter()

    def evaluate(self) -> None:
        self.val_loss = evaluate(
            self.recipe.model, self.val_loader, self.config.eval_batches, self.device, self.recipe.dtype, self.ranks
        )
        per_token = self.data.val_bytes_per_token
        self.val_bpb = self.val_loss / math.log(2) / per_token if per_token else None
        self.record({"step": self.step, "val_loss": self.val_loss, "val_bpb": self.val_bpb})
        self.display.message(
            f"step {self.step}: val loss {self.val_loss:.4f} | val bits/byte {'n/a' if self.val_bpb is None else f'{self.val_bpb:.3f}'}"
        )

    def checkpoint(self) -> None:
        """Write ckpt_<step>: never from a non-finite loss; a full disk is said, with what was needed."""
        if self.window_steps:
            self.check_finite(self.window_mean())
        try:
            self.last_checkpoint = self.save()
        except Exception as err:
            if not is_disk_full(err):
                raise
            message = disk_full_message(self.out_dir, self.step, self.recipe.state_bytes(), self.last_checkpoint)
            raise OneboxError(message) from None

    def save(self) -> Path:
        path = checkpoint_path(self.out_dir, self.step)
        weights = self.recipe.weights(path, self.ranks)
        if not self.ranks.main:
            barrier(self.ranks)
            return path
        path = save_checkpoint(  # last: a checkpoint exists once this small file does
            path,
            {
                "onebox_version": __version__,
                "world": self.ranks.world,
                "memory": self.recipe.strategy.name,
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                **weights,
                "data": self.loader.state_dict(),
                "rng": _rng_state(self.device),
                "model_config": config_dict(self.model_config),
                "train_config": config_dict(self.config),
                "tokenizer_json": self.tokenizer_json,
                "train_loss": self.last_loss,
            },
        )
        prune_checkpoints(self.out_dir, self.config.keep_last, self.step)
        barrier(self.ranks)
        return path


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

    def say(message: str) -> None:
        if ranks.main:
            console.print(message, highlight=False)

    try:
        device = pick_device(device_setting)
        begin = start(model_config, config, resume, ranks, say)
        if begin.complete:
            saved = begin.saved
            return TrainResult(
                begin.out_dir, saved["step"], saved.get("train_loss"), None, None, Path(saved["path"]), None
            )
        return Trainer(begin, ranks, device, console, show_progress and ranks.main).run()
    finally:
        shutdown(ranks)
