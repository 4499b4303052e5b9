"""Checkpoints: atomic save, load with clear errors, latest and pruning."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from onebox.errors import OneboxError

CHECKPOINT_FORMAT = "onebox-checkpoint-1"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    """Path of the checkpoint taken after `step` optimizer steps."""
    return Path(out_dir) / f"ckpt_{step:07d}.pt"


def checkpoint_step(path: str | Path) -> int:
    """The step in a checkpoint's file name (ckpt_0000012.pt -> 12)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise OneboxError(f"{path} is not named like a checkpoint (ckpt_<step>.pt).")
    return int(match.group(1))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first (temp files of interrupted saves are ignored)."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write payload atomically: to a temp file in the same folder, fsync, then rename over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def sharded_folder(path: str | Path) -> Path:
    """Where the shards of a multi-process checkpoint ckpt_N.pt live: the folder ckpt_N.dcp beside it."""
    return Path(path).with_suffix(".dcp")


def prune_checkpoints(out_dir: str | Path, keep_last: int, up_to: int) -> None:
    """Delete all but the newest keep_last checkpoints of the trajectory up to step `up_to` (with their shard
    folders); a checkpoint of a later step belongs to no trajectory that reached up_to and is never touched."""
    mine = [p for p in list_checkpoints(out_dir) if checkpoint_step(p) <= up_to]
    for old in mine[:-keep_last]:
        shutil.rmtree(sharded_folder(old), ignore_errors=True)
        old.unlink(missing_ok=True)


def model_state(payload: dict[str, Any]) -> dict[str, Any]:
    """The whole model's state dict of a loaded checkpoint, gathered from its shards when several processes wrote it
    (a LoRA run's checkpoint holds only adapters: training.start.checkpoint_state merges them into its base)."""
    if payload.get("lora"):
        raise OneboxError(f"{payload['path']} holds LoRA adapters, not a model: read it with checkpoint_state.")
    if not payload.get("sharded"):
        return payload["model"]
    from onebox.config import model_config_from_dict
    from onebox.distributed import load_sharded
    from onebox.model import build_model

    folder = sharded_folder(payload["path"])
    if not folder.is_dir():
        raise OneboxError(
            f"checkpoint {payload['path']} was written by several processes, but its shard folder {folder} is missing."
        )
    model = build_model(model_config_from_dict(payload["model_config"]), "meta").to_empty(device="cpu")
    load_sharded(folder, model)
    return model.state_dict()


def resolve_checkpoint(path_or_dir: str | Path) -> Path:
    """A checkpoint file, or the latest one in a run folder."""
    path = Path(path_or_dir)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise OneboxError(
                f"run folder {path} holds no checkpoint (ckpt_*.pt): train first, or give a checkpoint file."
            )
        return latest
    if not path.is_file():
        raise OneboxError(f"checkpoint {path} does not exist: give a ckpt_*.pt file or a run folder.")
    return path


def load_checkpoint(path_or_dir: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, turning unreadable or foreign files into OneboxError."""
    path = resolve_checkpoint(path_or_dir)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise OneboxError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}): use an earlier checkpoint of the run "
            f"(they are kept as ckpt_*.pt) or train again."
        ) from None
    except Exception as err:  # torch's unpickler raises KeyError, TypeError, ... for files it was never meant to read
        raise OneboxError(
            f"{path} is not a onebox checkpoint (it cannot be read as one: {type(err).__name__}): "
            "give a ckpt_*.pt written by `onebox train`, or its run folder."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise OneboxError(f"{path} is not a onebox checkpoint: give a ckpt_*.pt written by `onebox train`.")
    payload["path"] = str(path)
    return payload
