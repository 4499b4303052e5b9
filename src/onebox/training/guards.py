"""What keeps a training run safe while it runs: Ctrl-C stops it at a step boundary with a checkpoint,
and running out of memory becomes a message with the estimate and the remedies."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from onebox.config import ModelConfig, TrainConfig
from onebox.errors import OneboxError
from onebox.memory import out_of_memory_message


@contextmanager
def memory_errors(model: ModelConfig, config: TrainConfig, mixed: bool, device: torch.device) -> Iterator[None]:
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
def stop_on_sigint() -> Iterator[dict[str, bool]]:
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
