"""The Transformer against direct references: causality, RoPE, GQA, parameter and FLOP counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import micro_model

from onebox.config import ModelConfig
from onebox.errors import OneboxError
from onebox.model import Transformer, apply_rope, build_model, rope_tables
from onebox.presets import PRESETS, REAL_PRESETS, preset


def test_future_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = Transformer(micro_model()).eval()
    idx = torch.randint(0, 512, (2, 40))
    changed = idx.clone()
    changed[:, 25:] = torch.randint(0, 512, (2, 15))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_rope_matches_complex_rotation_reference():
    # Reference: rotate each pair (x_i, x_{i+half}) by angle pos * base^(-2i/d), written with complex numbers.
    torch.manual_seed(0)
    seq, dim, base = 17, 16, 10000.0
    x = torch.randn(2, 3, seq, dim, dtype=torch.float64)
    cos, sin = rope_tables(seq, dim, base)
    got = apply_rope(x, cos.double(), sin.double())
    half = dim // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * freqs[None, :]
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat([z.real, z.imag], dim=-1)
    assert torch.allclose(got, expected, atol=1e-6)  # fp32 angle tables: ~1e-7 relative


def test_rope_preserves_relative_position_dot_products():
    torch.manual_seed(1)
    cos, sin = rope_tables(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def rotated(v, pos):
        return apply_rope(v[None, None, None], cos[pos : pos + 1], sin[pos : pos + 1])[0, 0, 0]

    assert torch.allclose(rotated(q, 3) @ rotated(k, 1), rotated(q, 12) @ rotated(k, 10), atol=1e-5)


def _reference_attention(attn, x, cos, sin):
    """Explicit softmax attention with key/value heads repeated for each query group."""
    b, t, d = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, t, attn.heads, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, attn.kv_heads, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, attn.kv_heads, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = attn.heads // attn.kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    out = F.softmax(scores, dim=-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_attention_matches_repeated_heads_reference(kv_heads):
    torch.manual_seed(2)
    model = Transformer(micro_model(kv_heads=kv_heads)).double()
    attn = model.layers[0].self_attn
    x = torch.randn(2, 20, 64, dtype=torch.float64)
    cos, sin = model.rope_cos[:20].double(), model.rope_sin[:20].double()
    assert torch.allclose(attn(x, cos, sin), _reference_attention(attn, x, cos, sin), atol=1e-10)


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_feedforward_activation(activation):
    torch.manual_seed(3)
    mlp = Transformer(micro_model(activation=activation)).layers[0].mlp
    x = torch.randn(3, 64)
    gate = mlp.gate_proj(x)
    act = F.silu(gate) if activation == "swiglu" else torch.relu(gate) ** 2
    assert torch.allclose(mlp(x), mlp.down_proj(act * mlp.up_proj(x)), atol=1e-6)


def test_softcap_bounds_logits():
    model = Transformer(micro_model(logit_softcap=5.0))
    with torch.no_grad():
        model.embed_tokens.weight.mul_(100)
        logits = model(torch.randint(0, 512, (1, 8)))
    assert logits.abs().max() <= 5.0
    assert logits.abs().max() > 4.0


@pytest.mark.parametrize("tie", [True, False])
def test_num_params_is_exact(tie):
    config = micro_model(tie_embeddings=tie)
    assert config.num_params() == sum(p.numel() for p in Transformer(config).parameters())


def test_presets_have_their_shapes():
    assert len([n for n in PRESETS if n[-2:] in ("-A", "-B", "-C", "-D", "-E")]) == 25
    assert preset("600m-A").shape() == "1536d/4096h/20L/seq512"
    assert preset("5b-E").seq_len == 256 and preset("5b-E").dim == 3072
    assert preset("30b").shape() == "6144d/16384h/64L/seq512"
    assert preset("48m").shape() == "768d/2048h/6L/seq512"
    synthetic = [cfg for name, cfg in PRESETS.items() if name != "tiny" and name not in REAL_PRESETS]
    assert all(cfg.head_size == 128 and cfg.family == "llama" for cfg in synthetic)
    assert 1e6 < preset("tiny").num_params() < 10e6


def test_flops_formula_matches_issue_definition():
    c = preset("600m-A")
    n_matmul = c.layers * (4 * c.dim**2 + 3 * c.dim * c.hidden) + c.vocab_size * c.dim
    assert c.flops_per_token() == 6 * n_matmul + 12 * c.layers * c.dim * c.seq_len


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(dim=100, heads=3), "not divisible by heads"),
        (dict(heads=4, kv_heads=3), "not a multiple of kv_heads"),
        (dict(activation="gelu"), "activation must be one of"),
        (dict(layers=0), "layers must be a positive integer"),
        (dict(dim=12, heads=4), "must be even"),
    ],
)
def test_invalid_model_config_is_refused_with_a_reason(changes, message):
    with pytest.raises(OneboxError, match=message):
        micro_model(**changes)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(OneboxError, match="Known presets: tiny, 48m"):
        preset("nope")


def test_model_config_kv_heads_defaults_to_heads():
    assert ModelConfig(dim=256, heads=2).kv_heads == 2


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_fused_projections_give_the_same_logits_and_share_the_weights(activation):
    """Inference's fused q/k/v and gate/up products against the separate ones (fp32: 1e-5), with and without a
    KV cache; the separate weights become views of the fused ones, and the saved state is unchanged."""
    from onebox.model import fuse_projections

    torch.manual_seed(0)
    model = Transformer(micro_model(activation=activation)).eval()  # GQA: 4 query heads, 2 key/value heads
    idx = torch.randint(0, 512, (2, 30))
    keys, params = list(model.state_dict()), sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        plain = model(idx)
        caches = model.new_kv_caches(2)
        plain_cached = model(idx[:, :20], torch.arange(20), caches)
        fuse_projections(model)
        fused = model(idx)
        caches = model.new_kv_caches(2)
        fused_cached = model(idx[:, :20], torch.arange(20), caches)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_cached, plain_cached, rtol=1e-5, atol=1e-5)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_weight.untyped_storage().data_ptr()
    assert list(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == params


def test_a_bf16_model_starts_from_the_fp32_models_weights_with_the_same_seed():
    """The memory strategies (bf16 weights) are compared against fp32 AdamW from one starting point."""
    config = ModelConfig(name="t", dim=64, hidden=128, layers=2, heads=4, seq_len=32, vocab_size=256)
    torch.manual_seed(1)
    full = build_model(config, "cpu", torch.float32)
    torch.manual_seed(1)
    half = build_model(config, "cpu", torch.bfloat16)
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(full.parameters(), half.parameters()))
    assert (
        half.layers[0].self_attn.o_proj.weight.float().std()
        < 0.5 * half.layers[0].self_attn.q_proj.weight.float().std()
    )  # scaled init kept
