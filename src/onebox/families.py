"""The Hugging Face model families onebox reads and writes: llama, mistral, qwen2 and qwen3 (dense).

All four are the same decoder with the same parameter names (model.layers.N.self_attn.q_proj, ...,
mlp.gate_proj, input_layernorm, norm, lm_head); they differ in config fields, which map to ModelConfig
fields here, both ways: Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Llama's optional attention
and MLP biases, explicit head sizes, RoPE scaling (linear, llama3), sliding windows. A field onebox does
not implement is refused by name and value, never ignored.
"""

from __future__ import annotations

from typing import Any

from onebox import __version__
from onebox.config import FAMILIES, ModelConfig
from onebox.errors import OneboxError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
QWEN = ("qwen2", "qwen3", "qwen3_moe")
QK_NORM = ("qwen3", "qwen3_moe")
ATTENTION_BIAS = ("llama", "qwen3", "qwen3_moe")  # attention_bias: q, k, v and o together
EXPERT_NAMES = {  # where a family's files keep a block's experts, and each expert's gate, up and down
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
}
ACTIVATION_TO_HF = {"swiglu": "silu", "relu2": "relu2"}
HF_TO_ACTIVATION = {v: k for k, v in ACTIVATION_TO_HF.items()}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
IMPORT_CONTEXT = 8192  # the context an imported model runs at when its own is longer (KV caches, rope tables)


def _refuse(field: str, value: Any, why: str) -> OneboxError:
    return OneboxError(f"this model's config.json sets {field} = {value!r}, which onebox does not implement: {why}.")


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings of a config.json as onebox fields: transformers 5's rope_parameters, or the older
    rope_theta + rope_scaling."""
    params = hf.get("rope_parameters")
    if not isinstance(params, dict):
        params = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)}
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return out
    if kind not in ("linear", "llama3"):
        raise _refuse("rope_type", kind, "it implements default, linear and llama3 RoPE")
    try:
        if kind == "linear":
            return {**out, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
        return {
            **out,
            "rope_scaling": "llama3",
            "rope_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params.get("low_freq_factor", 1.0)),
            "rope_high_freq_factor": float(params.get("high_freq_factor", 4.0)),
            "rope_original_context": int(params["original_max_position_embeddings"]),
        }
    except (KeyError, TypeError, ValueError) as err:
        raise OneboxError(f"config.json's {kind} RoPE settings are incomplete or not numbers ({err!r}).") from None


def _sliding_window(hf: dict[str, Any], family: str) -> int:
    """The window of the layers that slide (0: none): Mistral's sliding_window on every layer; Qwen's only with
    use_sliding_window, from max_window_layers on."""
    window = hf.get("sliding_window")
    if family in QWEN:
        layers = hf["num_hidden_layers"]
        if not hf.get("use_sliding_window") or hf.get("max_window_layers", layers) >= layers:
            return 0
    if family == "llama" or not window:
        return 0
    return int(window)


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """A ModelConfig from a config.json of one of the families, refusing what onebox does not implement. A
    model with a sliding window runs at a context up to the window (where sliding and full attention agree);
    one whose context is longer than IMPORT_CONTEXT runs at that (max_positions keeps its own for export)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise OneboxError(
            f"config.json has model_type {family!r}: onebox imports {', '.join(FAMILIES)} (dense) models."
        )
    for key in REQUIRED:
        if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool) or hf[key] <= 0:
            raise OneboxError(
                f"config.json has no valid {key} (a positive integer; got {hf.get(key)!r}): it is not a complete "
                f"{family} config. Use the config.json that came with the weights."
            )
    act = hf.get("hidden_act", "silu")
    if act not in HF_TO_ACTIVATION:
        raise _refuse("hidden_act", act, "it implements silu (SwiGLU) and relu2")
    for field in ("attention_dropout",):
        if hf.get(field):
            raise _refuse(field, hf[field], "it trains without attention dropout")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise _refuse("pretraining_tp", hf["pretraining_tp"], "give a checkpoint saved with pretraining_tp 1")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = True if family == "qwen2" else attention_bias and family in ATTENTION_BIAS
    o_bias = attention_bias and family in ATTENTION_BIAS
    if attention_bias and family in ("mistral", "mixtral"):
        raise _refuse("attention_bias", True, "Mistral's attention has no biases")
    mlp_bias = bool(hf.get("mlp_bias", False))
    if mlp_bias and family != "llama":
        raise _refuse("mlp_bias", True, f"{family} has no MLP biases")
    moe = _experts(hf, family)
    window = _sliding_window(hf, family)
    positions = int(hf.get("max_position_embeddings", 2048))
    context = min(positions, IMPORT_CONTEXT, window or positions)
    return ModelConfig(
        name=name,
        family=family,
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        hidden=hf["intermediate_size"],
        layers=hf["num_hidden_layers"],
        heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=0 if head_dim * heads == hf["hidden_size"] else head_dim,
        seq_len=context,
        max_positions=positions if positions != context else 0,
        sliding_window=window,
        activation=HF_TO_ACTIVATION[act],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=family in QK_NORM,
        **moe,
        **_rope(hf),
    ).validate()


def _experts(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a qwen3_moe or mixtral config.json (every block sparse)."""
    if family == "qwen3_moe":
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            field = "decoder_sparse_step" if hf.get("decoder_sparse_step", 1) != 1 else "mlp_only_layers"
            raise _refuse(field, hf[field], "every block of its mixtures of experts is sparse")
        return {
            "experts": int(
                hf.get("num_experts") or hf.get("num_local_experts") or 0
            ),  # (transformers 5 writes the latter)
            "experts_per_token": int(hf.get("num_experts_per_tok", 0)),
            "expert_hidden": int(hf.get("moe_intermediate_size", 0)),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
            **_router_losses(hf),
        }
    if family == "mixtral":
        if hf.get("router_jitter_noise"):
            raise _refuse("router_jitter_noise", hf["router_jitter_noise"], "its router takes no noise")
        return {
            "experts": int(hf.get("num_local_experts", 0)),
            "experts_per_token": int(hf.get("num_experts_per_tok", 0)),
            "expert_hidden": int(hf["intermediate_size"]),
            "norm_topk_prob": True,
            **_router_losses(hf),
        }
    return {}


def _router_losses(hf: dict[str, Any]) -> dict[str, Any]:
    """The load-balancing weight, used as transformers uses it: where the config asks for router logits."""
    coef = float(hf.get("router_aux_loss_coef") or 0.0)
    return {"router_aux_loss_coef": coef if hf.get("output_router_logits") else 0.0}


def hf_names(key: str, config: ModelConfig) -> list[str]:
    """The Hugging Face tensors a onebox parameter is made of: its own name under `model.`, or for stacked
    experts each expert's tensors in order (gate_up: expert 0's gate and up, expert 1's, ...; down: each
    expert's down)."""
    if key == "lm_head.weight":
        return [key]
    if not config.experts or not key.endswith(("mlp.gate_up", "mlp.down", "mlp.router.weight")):
        return [f"model.{key}"]
    where, (gate, up, down) = EXPERT_NAMES[config.family]
    base = f"model.layers.{key.split('.')[1]}.{where}"
    if key.endswith("router.weight"):
        return [f"{base}.gate.weight"]
    if key.endswith("gate_up"):
        return [f"{base}.experts.{j}.{part}.weight" for j in range(config.experts) for part in (gate, up)]
    return [f"{base}.experts.{j}.{down}.weight" for j in range(config.experts)]


def join_experts(key: str, parts: list[Any]) -> Any:
    """One onebox parameter from the tensors `hf_names` lists: itself, or the experts stacked."""
    import torch

    if len(parts) == 1 and not key.endswith(("mlp.gate_up", "mlp.down")):
        return parts[0]
    if key.endswith("gate_up"):
        return torch.stack([torch.cat(parts[i : i + 2]) for i in range(0, len(parts), 2)])
    return torch.stack(parts)


def split_experts(key: str, tensor: Any, config: ModelConfig) -> dict[str, Any]:
    """A onebox parameter as the Hugging Face tensors of its family's files (the inverse of join_experts)."""
    names = hf_names(key, config)
    if len(names) == 1 and not key.endswith(("mlp.gate_up", "mlp.down")):
        return {names[0]: tensor}
    if key.endswith("gate_up"):
        pieces = [half for expert in tensor for half in expert.chunk(2)]
    else:
        pieces = list(tensor)
    return dict(zip(names, pieces, strict=True))


def _rope_fields(config: ModelConfig) -> dict[str, Any]:
    scaling: dict[str, Any] | None = None
    if config.rope_scaling == "linear":
        scaling = {"rope_type": "linear", "factor": config.rope_factor}
    elif config.rope_scaling == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": config.rope_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_context,
        }
    return {"rope_theta": config.rope_base, "rope_scaling": scaling}


def _check_exportable(config: ModelConfig) -> None:
    family = config.family
    if config.logit_softcap > 0:
        raise OneboxError(
            f"this model uses a logit soft-cap ({config.logit_softcap}), which Hugging Face's {ARCHITECTURES[family]} "
            "cannot express: an exported model would give different outputs. Train without --logit-softcap to export."
        )
    rules = {  # what each family's transformers class can hold, as (it can, what the config asks)
        "qk_norm": (family in QK_NORM, config.qk_norm),
        "mlp_bias": (family == "llama", config.mlp_bias),
        "o_bias": (family in ATTENTION_BIAS, config.o_bias),
        "qkv_bias": (family not in ("mistral", "mixtral"), config.qkv_bias),
        "sliding_window": (family != "llama", config.sliding_window > 0),
        "norm_topk_prob false": (family != "mixtral", config.experts > 0 and not config.norm_topk_prob),
    }
    for field, (holds, asked) in rules.items():
        if asked and not holds:
            raise OneboxError(
                f"the model sets {field}, which a {family} model cannot hold: export it as another family."
            )
    if family in QK_NORM and not config.qk_norm:
        raise OneboxError(f"a {family} model has q/k norms, and this one has none (qk_norm false): export it as llama.")
    if family == "qwen2" and not config.qkv_bias:
        raise OneboxError("a qwen2 model has q/k/v biases, and this one has none: export it as llama.")
    if family in ATTENTION_BIAS and config.qkv_bias != config.o_bias:
        raise OneboxError(
            f"a {family} model has biases on q, k, v and o together (attention_bias) or on none; this one has qkv_bias "
            f"{config.qkv_bias} and o_bias {config.o_bias}: export it as qwen2 (q/k/v biases only)."
        )


def hf_config(config: ModelConfig, dtype: str, eos: int | None) -> dict[str, Any]:
    """The config.json of the model's family (config.family) for a onebox model, refusing what it cannot express."""
    _check_exportable(config)
    family = config.family
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": ACTIVATION_TO_HF[config.activation],
        "max_position_embeddings": config.max_positions or config.seq_len,
        "rms_norm_eps": config.norm_eps,
        **_rope_fields(config),
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": dtype,
        "use_cache": True,
        "onebox_version": __version__,
    }
    if family in ATTENTION_BIAS:
        out["attention_bias"] = config.qkv_bias
    if family == "llama":
        out["mlp_bias"] = config.mlp_bias
    if family in ("mistral", "mixtral"):
        out["sliding_window"] = config.sliding_window or None
    if family == "qwen3_moe":
        out.update(
            num_experts=config.experts,
            num_experts_per_tok=config.experts_per_token,
            moe_intermediate_size=config.expert_hidden,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=config.router_aux_loss_coef > 0,
            router_aux_loss_coef=config.router_aux_loss_coef,
        )
    if family == "mixtral":
        out.update(
            num_local_experts=config.experts,
            num_experts_per_tok=config.experts_per_token,
            intermediate_size=config.expert_hidden,
            router_jitter_noise=0.0,
            output_router_logits=config.router_aux_loss_coef > 0,
            router_aux_loss_coef=config.router_aux_loss_coef,
        )
    if family in QWEN:
        out.update(
            use_sliding_window=config.sliding_window > 0,
            sliding_window=config.sliding_window or None,
            max_window_layers=0 if config.sliding_window else config.layers,
        )
    return out
