"""What a run starts from, checked before anything is built: its data, its weights (fresh, --init-from
or a checkpoint to resume), its run folder and the machine's memory."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from onebox.checkpoint import latest_checkpoint, load_checkpoint, model_state
from onebox.config import (
    ModelConfig,
    TrainConfig,
    apply_overrides,
    model_config_from_dict,
    train_config_from_dict,
)
from onebox.data import DatasetInfo, dataset_info, prepare_default_corpus, read_shard
from onebox.display import plural
from onebox.distributed import DistInfo
from onebox.errors import OneboxError
from onebox.export import load_hf
from onebox.lora import LoRASpec, apply_lora, base_state, load_adapters, spec_of
from onebox.model import Transformer, build_model
from onebox.plan import HOST_HEADROOM, Strategy, fits, machine_memory, predict
from onebox.runs import check_resume_target, remove_stale_temp_files, schedule_note, start_metrics, warmup_note
from onebox.tokenizer import tokenizer_identity

Say = Callable[[str], None]


@dataclass
class Start:
    """A run's checked inputs."""

    model: ModelConfig
    train: TrainConfig
    data: DatasetInfo
    out_dir: Path
    saved: dict[str, Any] | None  # the checkpoint resumed from
    state: dict[str, Any] | None  # --init-from weights
    tokenizer_json: str | None
    complete: bool = False  # the checkpoint to resume already reached max_steps: nothing to train

    @property
    def step(self) -> int:
        return self.saved["step"] if self.saved else 0


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


def rebatch(config: TrainConfig, saved_world: int, world: int, say: Say) -> TrainConfig:
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


def resolve_data(config: TrainConfig, say: Say) -> DatasetInfo:
    folder = Path(config.data).resolve() if config.data else prepare_default_corpus(progress=say)
    info = dataset_info(folder)
    say(
        f"data: {info.path}{'' if config.data else ', the default corpus'}: {plural(len(info.train_shards), 'train shard')}, "
        f"{plural(len(info.val_shards), 'validation shard')}"
    )
    return info


def lora_model(payload: dict[str, Any]) -> tuple[Transformer, LoRASpec]:
    """The adapted model of a LoRA run's checkpoint on the CPU (fp32): its base read again from the run's
    --init-from, the adapters from the checkpoint."""
    train = train_config_from_dict(payload["train_config"])
    config = model_config_from_dict(payload["model_config"])
    if not train.init_from or not Path(train.init_from).exists():
        raise OneboxError(
            f"{payload['path']} holds LoRA adapters for the model at {train.init_from or '(none)'}, which is not there: "
            "put the base model back at that path (the adapters alone are not a model)."
        )
    _, state, _ = initial_model(train.init_from, config)
    model = build_model(config, "cpu", torch.float32, state=state)
    spec = spec_of(train)
    apply_lora(model, spec)
    load_adapters(model, payload["model"])
    return model, spec


def checkpoint_state(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model as a plain state dict: model_state, or a LoRA run's base with its adapters merged in."""
    if payload.get("lora"):
        return base_state(lora_model(payload)[0], merged=True)
    return model_state(payload)


def initial_model(source: str, model_config: ModelConfig) -> tuple[ModelConfig, dict[str, Any], str | None]:
    """The config, weights and tokenizer.json text to start from (--init-from): a Hugging Face folder, a onebox
    run folder or a checkpoint file; the context is the smaller of the run's seq_len and the model's."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        initial, state, tokenizer_json = load_hf(path)
    else:
        payload = load_checkpoint(path)
        initial, state, tokenizer_json = (
            model_config_from_dict(payload["model_config"]),
            checkpoint_state(payload),
            payload.get("tokenizer_json"),
        )
    return apply_overrides(initial, {"seq_len": min(model_config.seq_len, initial.seq_len)}), state, tokenizer_json


def check_tokenizer(info: DatasetInfo, tokenizer_json: str | None, source: str, say: Say) -> None:
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


def check_vocab(info: DatasetInfo, model: ModelConfig) -> None:
    vocab = info.vocab_size
    if vocab is None:  # a foreign folder without meta.json: look at the tokens themselves
        vocab = int(read_shard(info.train_shards[0]).max()) + 1
    if vocab > model.vocab_size:
        raise OneboxError(
            f"the data's tokenizer has {vocab} entries but the model's vocabulary has {model.vocab_size}: "
            f"set --vocab-size {math.ceil(vocab / 64) * 64} (or more), or prepare the data with a smaller tokenizer."
        )


def check_host_memory(
    model: ModelConfig, config: TrainConfig, chosen: Strategy, device: Any, compiled: bool, mixed: bool, world: int
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


def start(model_config: ModelConfig, config: TrainConfig, resume: str | None, ranks: DistInfo, say: Say) -> Start:
    """Check and resolve what the run starts from (complete, and said, when the checkpoint to resume
    already reached max_steps). The main process opens the run folder (metrics cut back to the
    resumed step when it continues in its own folder)."""
    info = resolve_data(config, say)
    if config.data:  # stored resolved, so the run resumes from any working directory
        config = apply_overrides(config, {"data": str(info.path)})
    if config.init_from:  # the same for the model it starts from (a LoRA run reads its base again there)
        config = apply_overrides(config, {"init_from": str(Path(config.init_from).resolve())})
    saved = load_checkpoint(resume) if resume else None
    state = None
    if config.init_from and (saved is None or saved.get("lora")):  # LoRA resumes its adapters on the same base
        model_config, state, init_tokenizer = initial_model(config.init_from, model_config)
        check_tokenizer(info, init_tokenizer, config.init_from, say)
    check_vocab(info, model_config)
    out_dir = Path(config.out_dir or f"runs/{model_config.name}")
    if saved is None and latest_checkpoint(out_dir) is not None:
        raise OneboxError(
            f"{out_dir} already holds the checkpoints of a run: continue it with `onebox train --resume {out_dir}`, "
            f"or start a new run with another --out-dir (or delete that folder)."
        )
    if saved is not None:
        folder = Path(saved["path"]).parent
        if saved["step"] >= config.max_steps:
            say(
                f"the run in {folder} is complete: {saved['path']} is step {saved['step']} of max_steps {config.max_steps}. "
                f"To train further, resume with a larger --max-steps (e.g. onebox train --resume {folder} "
                f"--max-steps {2 * saved['step']})."
            )
            return Start(model_config, config, info, out_dir, saved, None, None, complete=True)
        check_resume_target(saved, out_dir, say)
        note = schedule_note(train_config_from_dict(saved["train_config"]), config, saved["step"])
        if note:
            say(note)
    note = warmup_note(config)
    if note:
        say(note)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out_dir, say)
        same_folder = saved is not None and out_dir.resolve() == Path(saved["path"]).parent.resolve()
        start_metrics(out_dir, saved["step"] if same_folder else None)
    if saved is not None and saved.get("world", 1) != ranks.world:
        config = rebatch(config, saved.get("world", 1), ranks.world, say)
    tokenizer_json = info.tokenizer_path.read_text() if info.tokenizer_path else None
    return Start(model_config, config, info, out_dir, saved, state, tokenizer_json)
