"""Model and training configuration: dataclasses, the preset table, parameter and FLOP counts."""

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
    rope_base: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.kv_heads == 0:
            self.kv_heads = self.heads

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.dim // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection."""
        return self.kv_heads * self.head_dim

    def validate(self) -> ModelConfig:
        """Raise OneboxError naming the first inconsistent field; return self when valid."""
        positive = ("vocab_size", "dim", "hidden", "layers", "heads", "kv_heads", "seq_len")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise OneboxError(f"model {key} must be a positive integer, got {value!r}.")
        if self.dim % self.heads:
            raise OneboxError(
                f"model dim {self.dim} is not divisible by heads {self.heads}: "
                f"choose heads so that dim / heads is a whole head size (e.g. heads={max(1, self.dim // 128)} "
                f"for head size 128)."
            )
        if self.head_dim % 2:
            raise OneboxError(f"head size dim/heads = {self.head_dim} must be even for rotary embeddings.")
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
        return self

    def shape(self) -> str:
        """Rustane-style one-line shape: dim/hidden/layers/seq."""
        return f"{self.dim}d/{self.hidden}h/{self.layers}L/seq{self.seq_len}"

    # -- counts ---------------------------------------------------------------------------------

    def matmul_params_per_layer(self) -> int:
        """Weights of one block that take part in matrix products (q, k, v, o, gate, up, down)."""
        return 2 * self.dim * self.dim + 2 * self.dim * self.kv_dim + 3 * self.dim * self.hidden

    def num_params(self) -> int:
        """Exact number of parameters of the model (tied embeddings counted once)."""
        per_layer = self.matmul_params_per_layer() + 2 * self.dim  # two RMSNorm weights
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return embeddings + self.layers * per_layer + self.dim  # + final norm

    def num_matmul_params(self) -> int:
        """N_matmul = L(2d^2 + 2 d kv_dim + 3 d hidden) + vocab d: weights used in a matmul per token."""
        return self.layers * self.matmul_params_per_layer() + self.vocab_size * self.dim

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 N_matmul + 12 L d seq.

        6 N_matmul counts the forward (2 per weight) and backward (4 per weight) matrix products,
        the output projection included, the embedding lookup not. 12 L d seq counts attention
        scores and the weighted sum of values (QK^T and AV: 2 x 2 d seq per token per layer
        forward, tripled for backward), over the full seq x seq square as PaLM and nanoGPT do,
        so MFU figures compare with theirs. Norms, RoPE and softmax are left out.
        """
        seq = self.seq_len if seq_len is None else seq_len
        return 6 * self.num_matmul_params() + 12 * self.layers * self.dim * seq

    def forward_flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward-only FLOPs per token: a third of flops_per_token."""
        return self.flops_per_token(seq_len) // 3


# --- presets ---------------------------------------------------------------------------------

# Architecture sweep (Rustane's five variants per scale): A baseline, B deeper and narrower,
# C wider and shallower, D fat FFN, E = A at seq 256. Head size 128, MHA, vocab 8192.
_SWEEP = {
    "600m": {"A": (1536, 4096, 20), "B": (1280, 3456, 28), "C": (1792, 4864, 14), "D": (1536, 6144, 16)},
    "1b": {"A": (2048, 5632, 28), "B": (1792, 4864, 36), "C": (2304, 6144, 20), "D": (2048, 8192, 20)},
    "1.5b": {"A": (2304, 6144, 32), "B": (2048, 5632, 40), "C": (2560, 6912, 24), "D": (2304, 9216, 22)},
    "3b": {"A": (2560, 6912, 40), "B": (2304, 6144, 48), "C": (3072, 8192, 28), "D": (2560, 10240, 28)},
    "5b": {"A": (3072, 8192, 44), "B": (2560, 6912, 60), "C": (3584, 9600, 32), "D": (3072, 12288, 32)},
}
SWEEP_SCALES = tuple(_SWEEP)
SWEEP_VARIANTS = ("A", "B", "C", "D", "E")

# Forward-only ladder (seq 512); 5b has the shape of 5b-A.
_LADDER = {
    "5b": (3072, 8192, 44),
    "7b": (4096, 11008, 32),
    "10b": (4096, 11008, 48),
    "13b": (5120, 13824, 40),
    "15b": (5120, 13824, 48),
    "20b": (5120, 13824, 64),
    "25b": (5120, 13824, 80),
    "30b": (6144, 16384, 64),
    "40b": (8192, 22016, 50),
    "50b": (8192, 22016, 62),
    "60b": (8192, 22016, 72),  # 58.3B: twice the one-H100 training ceiling (30b, 29.0B), for the 2-GPU ceiling
}
LADDER = tuple(_LADDER)[:8]  # 5b .. 30b: Rustane's ladder, the training ceiling's rungs
FORWARD_LADDER = tuple(_LADDER)[:10]  # and on to 50b for forward passes streamed past GPU memory
SHARDED_LADDER = tuple(_LADDER)  # 5b .. 60b: the training ceiling's rungs on several GPUs


def _build_presets() -> dict[str, ModelConfig]:
    table: dict[str, ModelConfig] = {
        # A few million parameters: the CPU demo (make run) and the tests' upper size.
        "tiny": ModelConfig(name="tiny", dim=256, hidden=768, layers=4, heads=4, seq_len=256),
        "48m": ModelConfig(name="48m", dim=768, hidden=2048, layers=6, heads=6, seq_len=512),
    }
    for scale, variants in _SWEEP.items():
        for variant in SWEEP_VARIANTS:
            dim, hidden, layers = variants["A" if variant == "E" else variant]
            seq = 256 if variant == "E" else 512
            name = f"{scale}-{variant}"
            table[name] = ModelConfig(name=name, dim=dim, hidden=hidden, layers=layers, heads=dim // 128, seq_len=seq)
    for name, (dim, hidden, layers) in _LADDER.items():
        table[name] = ModelConfig(name=name, dim=dim, hidden=hidden, layers=layers, heads=dim // 128, seq_len=512)
    return table


PRESETS: dict[str, ModelConfig] = _build_presets()


def preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset, or OneboxError listing the names."""
    if name not in PRESETS:
        raise OneboxError(f"unknown preset {name!r}. Known presets: {', '.join(PRESETS)}.")
    return dataclasses.replace(PRESETS[name])


def sweep_presets(scale: str) -> list[str]:
    """Names of the five sweep variants of one scale."""
    if scale not in _SWEEP:
        raise OneboxError(f"unknown sweep scale {scale!r}. Known scales: {', '.join(SWEEP_SCALES)}.")
    return [f"{scale}-{v}" for v in SWEEP_VARIANTS]


# --- training configuration -----------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's shape."""

    data: str = ""  # folder of token shards; empty = the embedded Shakespeare corpus
    out_dir: str = ""  # empty = runs/<model name>
    init_from: str = ""  # a Hugging Face Llama folder to start from
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


def resolve_configs(
    preset_name: str | None = None,
    config_file: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Preset, then TOML file, then explicit overrides, in that order; both configs validated."""
    doc: dict[str, Any] = load_toml(config_file) if config_file else {}
    name = preset_name or doc.get("preset") or "tiny"
    model = apply_overrides(preset(name), doc.get("model", {}))
    train = apply_overrides(TrainConfig(), doc.get("train", {}))
    model = apply_overrides(model, model_overrides or {})
    train = apply_overrides(train, train_overrides or {})
    return model.validate(), train.validate()


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


__all__ = [
    "ModelConfig",
    "TrainConfig",
    "PRESETS",
    "LADDER",
    "FORWARD_LADDER",
    "SWEEP_SCALES",
    "SWEEP_VARIANTS",
    "preset",
    "sweep_presets",
    "apply_overrides",
    "resolve_configs",
    "config_dict",
    "model_config_from_dict",
    "train_config_from_dict",
]
