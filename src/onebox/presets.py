"""The preset table: onebox's own shapes (tiny, 48m, the architecture sweep, the ladder), the shapes of the
models people have (random weights, for benchmarks and planning), and resolving a run's configs from a
preset, a TOML job file and flags."""

from __future__ import annotations

import dataclasses
from typing import Any

from onebox.config import ModelConfig, TrainConfig, apply_overrides, load_toml
from onebox.errors import OneboxError

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


# The shapes of the models people have, from their config.json files (random weights: for benchmarks and
# planning; import the real ones with --init-from / a model folder). seq_len 2048 is the context runs use;
# max_positions is the model's own.
_LLAMA3_ROPE = dict(rope_base=500000.0, rope_scaling="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
_REAL = {
    "llama3.2-1b": dict(
        family="llama",
        vocab_size=128256,
        dim=2048,
        hidden=8192,
        layers=16,
        heads=32,
        kv_heads=8,
        head_dim=64,
        tie_embeddings=True,
        max_positions=131072,
        rope_factor=32.0,
        rope_original_context=8192,
        **_LLAMA3_ROPE,
    ),
    "llama3.2-3b": dict(
        family="llama",
        vocab_size=128256,
        dim=3072,
        hidden=8192,
        layers=28,
        heads=24,
        kv_heads=8,
        head_dim=128,
        tie_embeddings=True,
        max_positions=131072,
        rope_factor=32.0,
        rope_original_context=8192,
        **_LLAMA3_ROPE,
    ),
    "llama3.1-8b": dict(
        family="llama",
        vocab_size=128256,
        dim=4096,
        hidden=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        tie_embeddings=False,
        max_positions=131072,
        rope_factor=8.0,
        rope_original_context=8192,
        **_LLAMA3_ROPE,
    ),
    "qwen3-0.6b": dict(
        family="qwen3",
        vocab_size=151936,
        dim=1024,
        hidden=3072,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        tie_embeddings=True,
        qk_norm=True,
        rope_base=1000000.0,
        norm_eps=1e-6,
        max_positions=40960,
    ),
    "qwen3-4b": dict(
        family="qwen3",
        vocab_size=151936,
        dim=2560,
        hidden=9728,
        layers=36,
        heads=32,
        kv_heads=8,
        head_dim=128,
        tie_embeddings=True,
        qk_norm=True,
        rope_base=1000000.0,
        norm_eps=1e-6,
        max_positions=40960,
    ),
    "qwen3-8b": dict(
        family="qwen3",
        vocab_size=151936,
        dim=4096,
        hidden=12288,
        layers=36,
        heads=32,
        kv_heads=8,
        head_dim=128,
        tie_embeddings=False,
        qk_norm=True,
        rope_base=1000000.0,
        norm_eps=1e-6,
        max_positions=40960,
    ),
    "qwen2.5-7b": dict(
        family="qwen2",
        vocab_size=152064,
        dim=3584,
        hidden=18944,
        layers=28,
        heads=28,
        kv_heads=4,
        tie_embeddings=False,
        qkv_bias=True,
        rope_base=1000000.0,
        norm_eps=1e-6,
        max_positions=131072,
    ),
    "mistral-7b": dict(
        family="mistral",
        vocab_size=32768,
        dim=4096,
        hidden=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        tie_embeddings=False,
        rope_base=1000000.0,
        max_positions=32768,
    ),
    "qwen3-30b-a3b": dict(
        family="qwen3_moe",
        vocab_size=151936,
        dim=2048,
        hidden=6144,
        layers=48,
        heads=32,
        kv_heads=4,
        head_dim=128,
        tie_embeddings=False,
        qk_norm=True,
        rope_base=1000000.0,
        norm_eps=1e-6,
        max_positions=40960,
        experts=128,
        experts_per_token=8,
        expert_hidden=768,
    ),
    "mixtral-8x7b": dict(
        family="mixtral",
        vocab_size=32000,
        dim=4096,
        hidden=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        tie_embeddings=False,
        rope_base=1000000.0,
        max_positions=32768,
        experts=8,
        experts_per_token=2,
        expert_hidden=14336,
    ),
    "qwen3-moe-tiny": dict(  # a small Qwen3-MoE for tests and CPU runs
        family="qwen3_moe",
        vocab_size=8192,
        dim=256,
        hidden=768,
        layers=4,
        heads=4,
        kv_heads=2,
        head_dim=64,
        tie_embeddings=False,
        qk_norm=True,
        rope_base=1000000.0,
        norm_eps=1e-6,
        experts=8,
        experts_per_token=2,
        expert_hidden=128,
    ),
}
# Qwen3-30B-A3B's layers, 8 of its 48: a mixture of experts of a real shape that trains on one GPU (5.6B, 1.1B active)
_REAL["qwen3-30b-a3b-8l"] = dict(_REAL["qwen3-30b-a3b"], layers=8)
REAL_PRESETS = tuple(_REAL)


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
    for name, fields_ in _REAL.items():
        table[name] = ModelConfig(name=name, seq_len=2048, **fields_).validate()
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
