"""Hugging Face folders (llama, mistral, qwen2, qwen3): export a onebox model to one, and import one (ours or
transformers'); the config fields of each family are in families.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from onebox import __version__
from onebox.checkpoint import list_checkpoints
from onebox.config import ModelConfig
from onebox.errors import OneboxError
from onebox.families import config_from_hf, hf_config, hf_names, join_experts, split_experts
from onebox.files import check_output_folder, is_disk_full, publish_folder, read_json, staging_folder
from onebox.lora import LoRASpec, write_peft_adapter
from onebox.model import Transformer, build_model
from onebox.tokenizer import eos_id, hf_tokenizer_files, tokenizer_from_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_state_dict(
    model_state: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """onebox parameter names -> the family's Hugging Face names (a prefix; stacked experts split per expert)."""
    out = {}
    for name, tensor in model_state.items():
        for hf_name, part in split_experts(name, tensor.detach(), config).items():
            out[hf_name] = part.to("cpu", dtype).contiguous()
    return out


EXPORT_MANIFEST = "onebox-export.json"
_EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    EXPORT_MANIFEST,
)


def earlier_export_files(folder: Path) -> list[str] | None:
    """The files an earlier `onebox export` wrote into `folder` (from its manifest), or None when it holds no export."""
    manifest = folder / EXPORT_MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text()).get("files")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            files = None
        if isinstance(files, list) and all(isinstance(f, str) and "/" not in f for f in files):
            return [*files, EXPORT_MANIFEST]
    config = folder / "config.json"
    try:  # an export from before the manifest: its config.json names onebox's version
        if config.is_file() and "onebox_version" in json.loads(config.read_text()):
            return [name for name in _EXPORT_FILES if (folder / name).is_file()]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        pass
    return None


def export_target(out_dir: Path, force: bool, run_dir: Path | None = None) -> list[str]:
    """Check that an export may be written to out_dir; return the earlier export's files it replaces.

    A new or empty folder is fine. A folder holding an earlier export is replaced only with force (and
    then only that export's own files); the run folder, a folder holding checkpoints and any other
    non-empty folder are refused, so nothing the user has is ever deleted."""
    check_output_folder(out_dir, "export target")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return []
    if (run_dir is not None and out_dir.resolve() == run_dir.resolve()) or list_checkpoints(out_dir):
        raise OneboxError(
            f"{out_dir} is a run folder (it holds checkpoints): export into a new folder, e.g. {out_dir / 'hf'}."
        )
    earlier = earlier_export_files(out_dir)
    if earlier is None:
        raise OneboxError(
            f"{out_dir} is not empty and holds no earlier export: give a new or empty folder (nothing in it is overwritten)."
        )
    if not force:
        raise OneboxError(
            f"{out_dir} holds an earlier export: add --force to replace its files (other files there stay), or give a new folder."
        )
    return earlier


def export_hf(
    model_state: dict[str, torch.Tensor],
    config: ModelConfig,
    tokenizer_json: str | None,
    out_dir: str | Path,
    dtype: str = "float32",
    force: bool = False,
    run_dir: Path | None = None,
) -> Path:
    """Write config.json, the weights (model.safetensors, or 5 GB shards and their index: save_shards),
    tokenizer files, generation_config.json and a manifest to out_dir.

    The files are written into a temporary folder beside out_dir and moved into place once complete
    (see export_target for what out_dir may already hold)."""
    if dtype not in DTYPES:
        raise OneboxError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    out_dir = Path(out_dir)
    replaced = export_target(out_dir, force, run_dir)
    tokenizer = tokenizer_from_json(tokenizer_json) if tokenizer_json else None
    eos = eos_id(tokenizer) if tokenizer is not None else None
    config_json = hf_config(config, dtype, eos)
    staging = staging_folder(out_dir)
    try:
        save_shards(hf_state_dict(model_state, config, DTYPES[dtype]), staging)
        (staging / "config.json").write_text(json.dumps(config_json, indent=2))
        generation = {"bos_token_id": eos, "eos_token_id": eos, "do_sample": True, "temperature": 0.8, "top_k": 200}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if tokenizer is not None:
            for name, text in hf_tokenizer_files(tokenizer, config.seq_len).items():
                (staging / name).write_text(text)
        files = sorted(p.name for p in staging.iterdir())
        (staging / EXPORT_MANIFEST).write_text(
            json.dumps({"format": "onebox-export-1", "onebox_version": __version__, "files": files}, indent=2)
        )
        publish_folder(staging, out_dir, replaced)
    except OSError as err:
        if is_disk_full(err):
            raise OneboxError(
                f"the disk holding {out_dir.parent} is full: the export needs about {_state_bytes(model_state, DTYPES[dtype]) / 1e9:.2f} GB; "
                "free some space or export elsewhere. Nothing at the target was changed."
            ) from None
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default


def save_shards(state: dict[str, torch.Tensor], folder: Path, shard_bytes: int | None = None) -> None:
    """The tensors as model.safetensors, or past shard_bytes as model-0000i-of-0000n.safetensors shards with
    model.safetensors.index.json, as save_pretrained writes them: each shard is serialised on its own, so a
    model larger than the host's free memory can be written."""
    shard_bytes = shard_bytes or SHARD_BYTES
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _state_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    return sum(t.numel() for t in state.values()) * torch.empty((), dtype=dtype).element_size()


# --- import -----------------------------------------------------------------------------------


_FOLDER_HINT = (
    "give a Hugging Face folder (config.json + model.safetensors, or shards with model.safetensors.index.json)"
)
_SKIPPED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved beside the weights


def _tensor_names(path: Path) -> set[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    except (SafetensorError, OSError) as err:
        raise OneboxError(f"{path} is not a readable safetensors file ({err}).") from None


class SafetensorsState(Mapping):
    """A model's weights by onebox name, read on demand from a folder's safetensors files (memory-mapped):
    a tensor is in memory only while it is copied into the model, so importing never holds two copies.
    The files and the index are checked when it is made: every shard present and readable, every tensor
    the index names in its shard."""

    def __init__(self, folder: Path, config: ModelConfig) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "weight index", _FOLDER_HINT).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise OneboxError(f"{index} has no weight_map: {_FOLDER_HINT}.")
        elif (folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise OneboxError(f"{folder} holds no model.safetensors (nor an index of shards): {_FOLDER_HINT}.")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        located: dict[str, str] = {}  # every tensor of the folder: the shard holding it
        for file in files:
            path = folder / file
            if not path.is_file() or path.parent.resolve() != folder.resolve():
                raise OneboxError(f"the shard {path} is missing: the folder must hold every file its index names.")
            names = _tensor_names(path)
            for name in names if weight_map is None else [n for n, f in weight_map.items() if f == file]:
                if name not in names:
                    raise OneboxError(
                        f"the index puts {name} in {path}, which does not hold it: the shard is damaged or from another model."
                    )
                located[name] = str(path)
        self.parts = {key: hf_names(key, config) for key in build_model(config, "meta").state_dict()}
        wanted = {name for names in self.parts.values() for name in names}
        missing = sorted(name for name in wanted if name not in located)
        ignored = {"lm_head.weight"} if config.tie_embeddings else set()
        unexpected = sorted(n for n in located if n not in wanted and n not in ignored and not n.endswith(_SKIPPED))
        if missing or unexpected:
            raise OneboxError(
                f"the weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                "The folder's config.json must describe its safetensors files."
            )
        self.located = located

    def __getitem__(self, key: str) -> torch.Tensor:
        """One parameter (its experts stacked), each shard mapped only while it is read (so the process
        holds no mapped file pages)."""
        return join_experts(key, self.read(self.parts[key]))

    def read(self, names: list[str]) -> list[torch.Tensor]:
        """These Hugging Face tensors, in order, each shard opened once (an expert stack's 2 x E tensors
        mostly share one) and mapped only while they are read."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.located[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, inside in by_shard.items():
            with safe_open(path, framework="pt") as handle:
                tensors.update((name, handle.get_tensor(name)) for name in inside)
        return [tensors[name] for name in names]

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


def load_hf(folder: str | Path) -> tuple[ModelConfig, SafetensorsState, str | None]:
    """(config, the weights by onebox name, read lazily, tokenizer.json text or None) from a Hugging Face
    folder of one of the families (families.py)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OneboxError(f"{folder} is not a folder: {_FOLDER_HINT}, written by `onebox export` or transformers.")
    config = config_from_hf(read_json(folder / "config.json", "model config", _FOLDER_HINT), name=folder.name)
    state = SafetensorsState(folder, config)
    tokenizer = folder / "tokenizer.json"
    return config, state, tokenizer.read_text() if tokenizer.is_file() else None


def model_from_hf(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, str | None]:
    """A ready Transformer in `dtype` on `device`, filled straight from the files, and tokenizer.json text."""
    config, state, tokenizer = load_hf(folder)
    return build_model(config, device, dtype, state=state), tokenizer


def export_adapter(
    model: torch.nn.Module,
    spec: LoRASpec,
    base: str,
    out_dir: str | Path,
    force: bool = False,
    run_dir: Path | None = None,
) -> Path:
    """A LoRA-adapted model's adapters as a PEFT adapter folder at out_dir (built beside it and moved in once
    complete; what out_dir may already hold as for export_hf)."""
    out_dir = Path(out_dir)
    replaced = export_target(out_dir, force, run_dir)
    staging = staging_folder(out_dir)
    try:
        write_peft_adapter(model, spec, staging, base)
        files = sorted(p.name for p in staging.iterdir())
        manifest = {"format": "onebox-export-1", "onebox_version": __version__, "files": files}
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
        publish_folder(staging, out_dir, replaced)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
