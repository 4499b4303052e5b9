"""Hugging Face Llama folders: export a onebox model to one, and import one (ours or transformers')."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from onebox import __version__
from onebox.checkpoint import list_checkpoints
from onebox.config import ModelConfig
from onebox.errors import OneboxError
from onebox.files import check_output_folder, is_disk_full, publish_folder, read_json, staging_folder
from onebox.model import Transformer, build_model
from onebox.tokenizer import eos_id, hf_tokenizer_files, tokenizer_from_json

_ACT_TO_HF = {"swiglu": "silu", "relu2": "relu2"}
_HF_TO_ACT = {v: k for k, v in _ACT_TO_HF.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(config: ModelConfig, dtype: str, eos: int | None) -> dict[str, Any]:
    """The config.json of LlamaForCausalLM for a onebox model (refusing what Llama cannot express)."""
    if config.logit_softcap > 0:
        raise OneboxError(
            f"this model uses a logit soft-cap ({config.logit_softcap}), which Hugging Face's Llama cannot express: "
            "an exported model would give different outputs. Train without --logit-softcap to export."
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": _ACT_TO_HF[config.activation],
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": dtype,
        "use_cache": True,
        "onebox_version": __version__,
    }


def hf_state_dict(
    model_state: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """onebox parameter names -> Hugging Face Llama names (a prefix; layouts are identical)."""
    out = {}
    for name, tensor in model_state.items():
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        out[hf_name] = tensor.detach().to("cpu", dtype).contiguous()
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
    """Write config.json, model.safetensors, tokenizer files, generation_config.json and a manifest to out_dir.

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
        save_file(
            hf_state_dict(model_state, config, DTYPES[dtype]),
            str(staging / "model.safetensors"),
            metadata={"format": "pt"},
        )
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


def _state_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    return sum(t.numel() for t in state.values()) * torch.empty((), dtype=dtype).element_size()


# --- import -----------------------------------------------------------------------------------


_FOLDER_HINT = "give a Hugging Face Llama folder (config.json + model.safetensors)"


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """A ModelConfig from a Llama config.json, refusing features onebox does not implement."""
    if hf.get("model_type") != "llama":
        raise OneboxError(
            f"only Llama models can be imported; this config.json has model_type {hf.get('model_type')!r}."
        )
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if hf.get("rope_scaling") or rope_type != "default":
        raise OneboxError(
            "this Llama uses RoPE scaling, which onebox does not implement: import a model with plain RoPE."
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise OneboxError("this Llama has attention or MLP biases, which onebox's model does not have.")
    act = hf.get("hidden_act", "silu")
    if act not in _HF_TO_ACT:
        raise OneboxError(f"hidden_act {act!r} is not supported: onebox implements silu (SwiGLU) and relu2.")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise OneboxError(
            f"head_dim {head_dim} x heads {heads} differs from hidden_size {hf['hidden_size']}: not supported."
        )
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        hidden=hf["intermediate_size"],
        layers=hf["num_hidden_layers"],
        heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads,
        seq_len=hf.get("max_position_embeddings", 2048),
        activation=_HF_TO_ACT[act],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_base=float(
            rope.get("rope_theta", hf.get("rope_theta", 10000.0))
            if isinstance(rope, dict)
            else hf.get("rope_theta", 10000.0)
        ),
        init_std=hf.get("initializer_range", 0.02),
    ).validate()


def _load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(read_json(index, "weight index", _FOLDER_HINT)["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise OneboxError(f"{path} is missing: the folder must hold the model's .safetensors weights.")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise OneboxError(f"{path} is not a readable safetensors file ({err}).") from None
    return tensors


def load_hf(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None]:
    """(config, onebox state dict in fp32, tokenizer.json text or None) from a Llama folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OneboxError(
            f"{folder} is not a folder: give a Hugging Face Llama folder written by `onebox export` or transformers."
        )
    config = config_from_hf(read_json(folder / "config.json", "model config", _FOLDER_HINT), name=folder.name)
    tensors = _load_safetensors(folder)
    state = {}
    for name, tensor in tensors.items():
        key = name.removeprefix("model.")
        if config.tie_embeddings and key == "lm_head.weight":
            continue
        state[key] = tensor.float()
    _check_keys(state, config)
    tokenizer = folder / "tokenizer.json"
    return config, state, tokenizer.read_text() if tokenizer.is_file() else None


def _check_keys(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    expected = set(build_model(config, "meta").state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise OneboxError(
            f"the weights do not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )


def model_from_hf(folder: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, str | None]:
    """A ready Transformer (fp32) and tokenizer.json text from a Llama folder."""
    config, state, tokenizer = load_hf(folder)
    return build_model(config, device, state=state), tokenizer
