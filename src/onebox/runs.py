"""Run folders: what resuming may do to one, and the housekeeping that keeps a folder one trajectory.

A run folder holds one training trajectory: its checkpoints (ckpt_N.pt), config.json and
metrics.jsonl. Resuming continues that trajectory where the user pointed (the checkpoint's folder,
or --out-dir for a fork into a new folder); resuming from an older checkpoint in a folder that holds
later ones would mix two trajectories, so it is refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from onebox.checkpoint import checkpoint_step, list_checkpoints
from onebox.config import TrainConfig, model_config_from_dict
from onebox.errors import OneboxError
from onebox.files import write_text_atomic
from onebox.optim import lr_factor

Say = Callable[[str], None]


def check_resume_target(payload: dict[str, Any], out_dir: Path, say: Say) -> None:
    """Refuse a resume that would mix trajectories or models; say what is resumed, from where, to where."""
    source = Path(payload["path"])
    step = payload["step"]
    model = model_config_from_dict(payload["model_config"])
    folder_config = out_dir / "config.json"
    if folder_config.is_file():
        try:
            recorded = json.loads(folder_config.read_text()).get("model")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            recorded = None
        if isinstance(recorded, dict) and model_config_from_dict(recorded) != model:
            raise OneboxError(
                f"{source} holds a {model.name} model ({model.shape()}), but {folder_config} describes a {recorded.get('name')} model: "
                "this checkpoint comes from another run. Resume it from its own folder, or into a new one with --out-dir."
            )
    same = out_dir.resolve() == source.parent.resolve()
    if same:
        later = [
            checkpoint_step(p)
            for p in list_checkpoints(out_dir)
            if checkpoint_step(p) > step and p.resolve() != source.resolve()
        ]
        if later:
            raise OneboxError(
                f"{source} is step {step}, but {out_dir} also holds later checkpoints of its run (step{'s' if len(later) > 1 else ''} "
                f"{', '.join(map(str, later[:4]))}): continuing here would mix two trajectories. Continue from the latest with --resume {out_dir}; "
                f"to continue from step {step} instead, fork into a new folder with --out-dir NEW_FOLDER, or move the later checkpoints aside."
            )
    elif list_checkpoints(out_dir):
        raise OneboxError(
            f"{out_dir} already holds the checkpoints of another run: fork from {source} into a new or empty folder (--out-dir)."
        )
    written = payload.get("train_config", {}).get("out_dir") or "?"
    where = "" if same else f", writing to {out_dir} (a fork: {source.parent} is left as it is)"
    say(
        f"resuming {model.name} ({model.shape()}, {model.num_params() / 1e6:.2f}M params) at step {step} from {source} "
        f"(a run written in {written}){where}"
    )


def remove_stale_temp_files(out_dir: Path, say: Say) -> None:
    """Remove what interrupted checkpoint saves of this run folder left behind (.ckpt_N.pt.tmp, .ckpt_N.dcp.tmp)."""
    if not out_dir.is_dir():
        return
    for stale in sorted(out_dir.glob(".ckpt_*.tmp")):
        size = (
            stale.stat().st_size if stale.is_file() else sum(p.stat().st_size for p in stale.rglob("*") if p.is_file())
        )
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        say(f"removed {stale.name} ({size / 1e6:,.0f} MB), left by an interrupted checkpoint save")


def start_metrics(out_dir: Path, resumed_step: int | None) -> None:
    """A new run starts metrics.jsonl afresh; a resumed one keeps only the entries up to its step (a run that
    stopped after its last checkpoint logged steps that the resumed trajectory now replaces)."""
    metrics = out_dir / "metrics.jsonl"
    if resumed_step is None or not metrics.is_file():
        metrics.unlink(missing_ok=True)
        return
    kept = []
    for line in metrics.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= resumed_step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    write_text_atomic(metrics, "".join(f"{line}\n" for line in kept))


def schedule_note(saved: TrainConfig, now: TrainConfig, step: int) -> str | None:
    """What a resumed run's changed schedule does to the learning rate, or None when it is unchanged."""
    keys = ("max_steps", "warmup_steps", "lr", "min_lr_ratio")
    if all(getattr(saved, k) == getattr(now, k) for k in keys):
        return None
    before, after = saved.lr * lr_factor(step, saved), now.lr * lr_factor(step, now)
    changed = ", ".join(
        f"{k} {getattr(saved, k)} -> {getattr(now, k)}" for k in keys if getattr(saved, k) != getattr(now, k)
    )
    return (
        f"the learning-rate schedule is recomputed ({changed}): at step {step} the lr goes from {before:.3g} to {after:.3g}, "
        f"then decays by cosine to {now.lr * now.min_lr_ratio:.3g} at step {now.max_steps}"
    )


def warmup_note(config: TrainConfig) -> str | None:
    """A warning when the warm-up covers the whole run (the learning rate would never decay)."""
    if config.warmup_steps >= config.max_steps:
        return (
            f"warning: warmup_steps {config.warmup_steps} >= max_steps {config.max_steps}: the learning rate only warms up and never "
            f"decays. Give --warmup-steps below {config.max_steps} (e.g. {config.max_steps // 10})."
        )
    return None


def payload_bytes(payload: Any) -> int:
    """Bytes of every tensor in a (nested) checkpoint payload: about what writing it needs on disk."""
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, dict):
        return sum(payload_bytes(v) for v in payload.values())
    if isinstance(payload, list | tuple):
        return sum(payload_bytes(v) for v in payload)
    return 0


def disk_full_message(folder: Path, step: int, needed: int, last_good: Path | None) -> str:
    """The message for a checkpoint that did not fit on the disk."""
    free = shutil.disk_usage(folder).free if folder.exists() else None
    last = f"the last good checkpoint is {last_good}" if last_good else "no earlier checkpoint was written"
    return (
        f"the disk holding {folder} is full: the checkpoint of step {step} (about {needed / 1e9:.2f} GB; "
        f"{'n/a' if free is None else f'{free / 1e9:.2f} GB'} free) was not written; {last}, and it is intact. "
        f"Free some space (or keep fewer checkpoints with --keep-last) and continue with onebox train --resume {folder}."
    )
