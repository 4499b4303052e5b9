"""Model and training configuration: validated dataclasses, parameter and FLOP counts, loading and
overriding (the preset table is presets.py)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from onebox.errors import OneboxError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ACTIVATIONS = ("swiglu", "relu2")
ROPE_SCALINGS = ("none", "linear", "llama3")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")  # the Hugging Face model_type it exports as
MOE_FAMILIES = ("qwen3_moe", "mixtral")
COMPILE_SETTINGS = ("auto", "on", "off", "block", "model")
PRECISIONS = ("auto", "bf16", "fp8", "fp32")
OPTIMIZERS = ("adamw", "muon")
MEMORY_SETTINGS = (
    "auto",
    "standard",
    "checkpointed",
    "bf16",
    "bf16-checkpointed",
    "offload",
    "offload-int8",
)  # auto + plan.STRATEGIES


@dataclass
class ModelConfig:
    """Shape of a decoder-only LLaMA-style transformer."""

    name: str = "custom"
    vocab_size: int = 8192
    dim: int = 768
    hidden: int = 2048
    layers: int = 6
    heads: int = 6
    kv_heads: int = 0  # 0 means the same as heads (plain multi-head attention)
    seq_len: int = 512
    activation: str = "swiglu"  # gate activation of the FFN: swiglu (SiLU gate) or relu2 (ReLU^2 gate)
    tie_embeddings: bool = True
    logit_softcap: float = 0.0  # 0 = off; otherwise logits = c * tanh(logits / c)
    norm_eps: float = 1e-5
    rope_base: float = 10000.0  # rope_theta
    init_std: float = 0.02
    head_dim: int = 0  # 0 means dim / heads; otherwise the size of one attention head, whatever dim and heads are
    rope_scaling: str = (
        "none"  # none | linear (positions divided by rope_factor) | llama3 (Llama 3.1's frequency bands)
    )
    rope_factor: float = 1.0  # linear and llama3: how much longer the context is than the one the model was made for
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths longer than original_context / this are scaled fully
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths shorter than original_context / this are kept
    rope_original_context: int = 0  # llama3: the context before scaling (original_max_position_embeddings)
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # a bias on the attention's output projection (Llama's attention_bias)
    mlp_bias: bool = False  # biases on gate, up and down (Llama's mlp_bias)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    max_positions: int = 0  # 0 means seq_len: the longest context the weights were made for (max_position_embeddings)
    sliding_window: int = 0  # 0: none; else the attention window of the layers that slide (seq_len may not exceed it)
    family: str = "llama"  # the Hugging Face model_type it exports as: llama, mistral, qwen2, qwen3, qwen3_moe, mixtral
    experts: int = 0  # 0: a dense FFN; else every block's FFN is this many SwiGLU experts behind a router
    experts_per_token: int = 0  # top-k: the experts each token goes through
    expert_hidden: int = 0  # each expert's FFN width (moe_intermediate_size; Mixtral's is `hidden`)
    norm_topk_prob: bool = True  # the top-k router probabilities renormalised to sum to 1
    router_aux_loss_coef: float = (
        0.0  # training: weight of the load-balancing loss (Switch Transformer's, as transformers')
    )
    router_z_loss_coef: float = (
        0.0  # training: weight of the router z-loss (ST-MoE: mean squared logsumexp of the logits)
    )

    def __post_init__(self) -> None:
        if self.kv_heads == 0:
            self.kv_heads = self.heads

    @property
    def head_size(self) -> int:
        """Size of one attention head: head_dim, or dim / heads where head_dim is 0."""
        return self.head_dim or self.dim // self.heads

    @property
    def q_dim(self) -> int:
        """Width of the query projection (heads x head size; dim unless head_dim says otherwise)."""
        return self.heads * self.head_size

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection."""
        return self.kv_heads * self.head_size

    def validate(self) -> ModelConfig:
        """Raise OneboxError naming the first inconsistent field; return self when valid."""
        positive = ("vocab_size", "dim", "hidden", "layers", "heads", "kv_heads", "seq_len")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise OneboxError(f"model {key} must be a positive integer, got {value!r}.")
        if not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise OneboxError(f"model head_dim must be 0 (dim / heads) or a positive integer, got {self.head_dim!r}.")
        if self.head_dim == 0 and self.dim % self.heads:
            raise OneboxError(
                f"model dim {self.dim} is not divisible by heads {self.heads}: "
                f"choose heads so that dim / heads is a whole head size (e.g. heads={max(1, self.dim // 128)} "
                f"for head size 128), or set head_dim."
            )
        if self.head_size % 2:
            raise OneboxError(f"head size {self.head_size} must be even for rotary embeddings.")
        if self.heads % self.kv_heads:
            raise OneboxError(
                f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}: grouped-query "
                f"attention shares each key/value head among heads/kv_heads query heads."
            )
        if self.activation not in ACTIVATIONS:
            raise OneboxError(f"model activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}.")
        if self.logit_softcap < 0:
            raise OneboxError(f"logit_softcap must be 0 (off) or positive, got {self.logit_softcap}.")
        if self.norm_eps <= 0 or self.rope_base <= 0 or self.init_std <= 0:
            raise OneboxError("norm_eps, rope_base and init_std must be positive.")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise OneboxError(
                f"model rope_scaling must be one of {', '.join(ROPE_SCALINGS)}, got {self.rope_scaling!r}."
            )
        if self.rope_scaling != "none" and self.rope_factor < 1:
            raise OneboxError(
                f"rope_factor must be at least 1 with rope_scaling {self.rope_scaling}, got {self.rope_factor}."
            )
        if self.rope_scaling == "llama3" and (
            self.rope_original_context <= 0 or self.rope_high_freq_factor <= self.rope_low_freq_factor
        ):
            raise OneboxError(
                "rope_scaling llama3 needs rope_original_context > 0 and rope_high_freq_factor > rope_low_freq_factor, "
                f"got {self.rope_original_context}, {self.rope_high_freq_factor} and {self.rope_low_freq_factor}."
            )
        if not isinstance(self.max_positions, int) or self.max_positions < 0:
            raise OneboxError(f"model max_positions must be 0 (seq_len) or positive, got {self.max_positions!r}.")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise OneboxError(f"model sliding_window must be 0 (none) or positive, got {self.sliding_window!r}.")
        if self.sliding_window and self.seq_len > self.sliding_window:
            raise OneboxError(
                f"model seq_len {self.seq_len} is longer than its sliding_window {self.sliding_window}: onebox runs "
                "sliding-window models at a context up to the window (where sliding and full attention agree); "
                f"use --seq-len {self.sliding_window} or less."
            )
        if self.experts:
            if not 0 < self.experts_per_token <= self.experts or self.expert_hidden <= 0:
                raise OneboxError(
                    f"a mixture of experts needs 0 < experts_per_token <= experts and expert_hidden > 0; got "
                    f"{self.experts_per_token} of {self.experts} experts, expert_hidden {self.expert_hidden}."
                )
            if self.activation != "swiglu" or self.mlp_bias:
                raise OneboxError(
                    "onebox's experts are SwiGLU FFNs without biases: set activation swiglu, mlp_bias false."
                )
            if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
                raise OneboxError("router_aux_loss_coef and router_z_loss_coef must be 0 (off) or positive.")
        elif self.experts_per_token or self.expert_hidden:
            raise OneboxError("experts_per_token and expert_hidden need experts > 0 (a mixture of experts).")
        if (self.family in MOE_FAMILIES) != bool(self.experts):
            raise OneboxError(
                f"family {self.family} {'is' if self.family in MOE_FAMILIES else 'is not'} a mixture of experts, "
                f"and this model has {self.experts} experts: set family to one of "
                f"{', '.join(MOE_FAMILIES if self.experts else [f for f in FAMILIES if f not in MOE_FAMILIES])}."
            )
        if self.family not in FAMILIES:
            raise OneboxError(f"model family must be one of {', '.join(FAMILIES)}, got {self.family!r}.")
        return self

    def shape(self) -> str:
        """Rustane-style one-line shape: dim/hidden/layers/seq."""
        return f"{self.dim}d/{self.hidden}h/{self.layers}L/seq{self.seq_len}"

    # -- counts ---------------------------------------------------------------------------------

    def matmul_params_per_layer(self, active: bool = False) -> int:
        """Weights of one block that take part in matrix products (q, k, v, o, gate, up, down; with experts
        the router and every expert, or with `active` the router and the experts one token goes through)."""
        attention = 2 * self.dim * self.q_dim + 2 * self.dim * self.kv_dim
        if not self.experts:
            return attention + 3 * self.dim * self.hidden
        used = self.experts_per_token if active else self.experts
        return attention + self.experts * self.dim + used * 3 * self.dim * self.expert_hidden

    def vector_params_per_layer(self) -> int:
        """Parameters of one block outside the matrices: the two RMSNorm scales, biases, q/k norms."""
        biases = (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + self.dim * self.o_bias
        biases += (2 * self.hidden + self.dim) * self.mlp_bias * (not self.experts)
        return 2 * self.dim + biases + 2 * self.head_size * self.qk_norm

    def num_params(self) -> int:
        """Exact number of parameters of the model (tied embeddings counted once)."""
        per_layer = self.matmul_params_per_layer() + self.vector_params_per_layer()
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return embeddings + self.layers * per_layer + self.dim  # + final norm

    def num_active_params(self) -> int:
        """Parameters one token goes through (all of them for a dense model; the routed experts only for a
        mixture of experts): what its speed and MFU are counted on."""
        if not self.experts:
            return self.num_params()
        unused = self.layers * (self.experts - self.experts_per_token) * 3 * self.dim * self.expert_hidden
        return self.num_params() - unused

    def num_matmul_params(self) -> int:
        """N_matmul = L(2d^2 + 2 d kv_dim + 3 d hidden) + vocab d: weights used in a matmul per token (with
        experts, only those a token goes through: the active parameters)."""
        return self.layers * self.matmul_params_per_layer(active=True) + self.vocab_size * self.dim

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 N_matmul + 12 L d seq.

        6 N_matmul counts the forward (2 per weight) and backward (4 per weight) matrix products,
        the output projection included, the embedding lookup not. 12 L d seq counts attention
        scores and the weighted sum of values (QK^T and AV: 2 x 2 d seq per token per layer
        forward, tripled for backward), over the full seq x seq square as PaLM and nanoGPT do,
        so MFU figures compare with theirs. Norms, RoPE and softmax are left out.
        """
        seq = self.seq_len if seq_len is None else seq_len
        return 6 * self.num_matmul_params() + 12 * self.layers * self.q_dim * seq

    def forward_flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward-only FLOPs per token: a third of flops_per_token."""
        return self.flops_per_token(seq_len) // 3


# --- training configuration -----------------------------------------------------------------


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the layers LoRA may adapt (onebox.lora)


def lora_targets(rank: int, alpha: float, dropout: float, targets: str) -> list[str]:
    """LoRA's settings checked (OneboxError naming what is wrong); the targets as a list."""
    chosen = [t.strip() for t in targets.split(",") if t.strip()]
    if not chosen or any(t not in LORA_TARGETS for t in chosen):
        raise OneboxError(
            f"--lora-targets {targets!r}: choose among {', '.join(LORA_TARGETS)} (comma-separated), e.g. q,v."
        )
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise OneboxError(
            f"LoRA rank {rank}, alpha {alpha:g}, dropout {dropout:g}: the rank must be at least 1, alpha above 0 "
            "and the dropout in [0, 1)."
        )
    return chosen


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's shape."""

    data: str = ""  # folder of token shards; empty = the embedded Shakespeare corpus
    out_dir: str = ""  # empty = runs/<model name>
    init_from: str = ""  # a Hugging Face folder of a family onebox reads, a run or a checkpoint
    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    lr: float = 1e-3  # peak AdamW learning rate
    embed_lr_mult: float = 1.0  # multiplier on lr for the embedding (and untied output) matrices
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = (
        "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp8 (torchao float8 block products) | fp32
    )
    compile: str = "auto"  # auto (on for CUDA) | on | off | block | model (see transforms.training_loss)
    activation_checkpointing: bool = False
    memory: str = "auto"  # auto (the planner's choice, see `onebox plan`) | standard | checkpointed | bf16 | bf16-checkpointed | offload
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    lora_rank: int = 0  # LoRA: rank of the adapters on a frozen --init-from model; 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ",".join(LORA_TARGETS)

    def validate(self) -> TrainConfig:
        """Raise OneboxError naming the first invalid field; return self when valid."""
        for key in ("batch_size", "grad_accum", "max_steps", "eval_batches", "keep_last", "log_every"):
            if getattr(self, key) <= 0:
                raise OneboxError(f"train {key} must be positive, got {getattr(self, key)}.")
        for key in ("warmup_steps", "eval_every", "ckpt_every", "grad_clip", "weight_decay"):
            if getattr(self, key) < 0:
                raise OneboxError(f"train {key} must be zero or positive, got {getattr(self, key)}.")
        if self.lr <= 0 or self.muon_lr <= 0 or self.embed_lr_mult <= 0:
            raise OneboxError("learning rates (lr, muon_lr, embed_lr_mult) must be positive.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise OneboxError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}.")
        if self.optimizer not in OPTIMIZERS:
            raise OneboxError(f"optimizer must be adamw or muon, got {self.optimizer!r}.")
        if self.memory not in MEMORY_SETTINGS:
            raise OneboxError(
                f"memory must be one of {', '.join(MEMORY_SETTINGS)} (see `onebox plan`), got {self.memory!r}."
            )
        if self.precision not in PRECISIONS:
            raise OneboxError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.compile not in COMPILE_SETTINGS:
            raise OneboxError(f"compile must be one of {', '.join(COMPILE_SETTINGS)}, got {self.compile!r}.")
        if self.lora_rank:
            lora_targets(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)
            if self.precision == "fp8":
                raise OneboxError("--precision fp8 is for full training; LoRA runs in bf16 or fp32: leave it at auto.")
            if not self.init_from:
                raise OneboxError(
                    "--lora-rank adapts a model you already have: give it with --init-from (a Hugging Face folder, "
                    "a run folder or a checkpoint)."
                )
        return self


# --- loading and overriding -------------------------------------------------------------------


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Convert a string (from the command line) or TOML value to the field's type."""
    types = {f.name: f.type for f in fields(cls)}
    if key not in types:
        raise OneboxError(f"unknown {cls.__name__} field {key!r}. Known fields: {', '.join(types)}.")
    kind = types[key]
    try:
        if kind in ("bool", bool):
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(value)
            return text in ("true", "1", "yes", "on")
        if kind in ("int", int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(str(value).replace("_", ""))
        if kind in ("float", float):
            return float(value)
        return str(value)
    except ValueError:
        raise OneboxError(f"{key} expects a {kind} value, got {value!r}.") from None


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """A copy of a config dataclass with fields replaced by name (values coerced to the field type)."""
    changes = {key: _coerce(type(config), key, value) for key, value in overrides.items()}
    updated = dataclasses.replace(config, **changes)
    if isinstance(updated, ModelConfig) and "heads" in changes and "kv_heads" not in changes:
        if config.kv_heads == config.heads:  # MHA stays MHA when only heads changes
            updated.kv_heads = updated.heads
    return updated


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML job file: optional `preset`, and [model] / [train] tables of field overrides."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            doc = tomllib.load(handle)
    except FileNotFoundError:
        raise OneboxError(f"config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as err:
        raise OneboxError(f"config file {path} is not valid TOML: {err}.") from None
    unknown = set(doc) - {"preset", "model", "train"}
    if unknown:
        raise OneboxError(f"config file {path} has unknown keys {sorted(unknown)}: use `preset`, [model] and [train].")
    return doc


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for checkpoints, logs and results)."""
    return dataclasses.asdict(config)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig saved by config_dict, ignoring keys a newer version may have added."""
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in data.items() if k in known}).validate()


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig saved by config_dict."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known}).validate()
