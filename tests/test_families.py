"""The model families against transformers itself: for llama (3.x: llama3 RoPE, biases), mistral (explicit
head_dim, sliding window), qwen2 (q/k/v biases), qwen3 (q/k norms, explicit head_dim), and the mixtures of
experts qwen3_moe and mixtral (the prefill's grouped experts and the decode's gathered ones), a tiny random
model built with the family's own config class and saved sharded by save_pretrained is imported, and its
logits (fp32, <= 1e-4) and cached greedy tokens equal transformers'; it trains, exports as the same
family, and transformers loads the export with logits equal to onebox's. Bad folders are clear errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import micro_model, micro_train

from onebox.checkpoint import load_checkpoint, model_state
from onebox.config import model_config_from_dict
from onebox.errors import OneboxError
from onebox.export import export_hf, load_hf, model_from_hf
from onebox.infer.generate import generate
from onebox.model import build_model
from onebox.training import train

transformers = pytest.importorskip("transformers")

SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
FAMILIES = {
    "llama3": lambda: transformers.LlamaConfig(
        **SHAPE,
        head_dim=32,  # not hidden / heads (16)
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
    "mistral": lambda: transformers.MistralConfig(**SHAPE, head_dim=24, sliding_window=96, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(
        **SHAPE, rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True
    ),
    "qwen3": lambda: transformers.Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=False),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **SHAPE, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        **SHAPE, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False
    ),
}


def _reference(name: str, seed: int = 0):
    """The family's transformers model with every weight random (biases and norm scales too, so each one counts)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[name](), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1 if param.dim() > 1 else 0.5).add_(1.0 if param.dim() == 1 else 0.0)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, its folder: saved sharded)."""
    model = _reference(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, max_shard_size="40KB")
    return request.param, model, folder


def test_the_folder_is_sharded_and_its_config_maps_to_the_family_features(family):
    name, _, folder = family
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    config, _, _ = load_hf(folder)
    expected = {
        "llama3": dict(family="llama", head_dim=32, rope_scaling="llama3", qkv_bias=True, o_bias=True, mlp_bias=True),
        "mistral": dict(family="mistral", head_dim=24, sliding_window=96, seq_len=96, max_positions=128),
        "qwen2": dict(family="qwen2", rope_scaling="linear", qkv_bias=True, o_bias=False, tie_embeddings=True),
        "qwen3": dict(family="qwen3", head_dim=32, qk_norm=True, qkv_bias=False, tie_embeddings=False),
        "qwen3_moe": dict(family="qwen3_moe", experts=4, experts_per_token=2, expert_hidden=32, qk_norm=True),
        "mixtral": dict(family="mixtral", experts=4, experts_per_token=2, expert_hidden=160, norm_topk_prob=True),
    }[name]
    assert {key: getattr(config, key) for key in expected} == expected


def test_logits_and_greedy_tokens_equal_transformers(family):
    _, reference, folder = family
    ours, _ = model_from_hf(folder)
    torch.manual_seed(1)
    idx = torch.randint(0, 512, (2, 80))
    with torch.no_grad():
        theirs = reference(idx).logits
        assert (ours(idx) - theirs).abs().max().item() <= 1e-4
        prompt = idx[:1, :12]
        want = reference.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    got = generate(ours, prompt[0].tolist(), 10, temperature=0)
    assert got.samples[0] == want[0, 12:].tolist()


def test_import_train_export_stays_the_same_family(family, tmp_path, corpus_dir):
    name, _, folder = family
    run = micro_train(tmp_path / "run", corpus_dir, init_from=str(folder), max_steps=5, eval_every=0)
    result = train(micro_model(), run, show_progress=False)  # the model is the folder's; the run's context 64
    assert result.step == 5
    payload = load_checkpoint(tmp_path / "run")
    config = model_config_from_dict(payload["model_config"])
    export_hf(model_state(payload), config, None, tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["model_type"] == load_hf(folder)[0].family
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(theirs).__name__ == exported["architectures"][0]
    ours = build_model(config, "cpu", state=model_state(payload)).eval()
    idx = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4


def test_a_bad_folder_is_a_clear_error(tmp_path):
    reference = _reference("qwen3")
    folder = tmp_path / "q"
    reference.save_pretrained(folder, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    (folder / shards[-1]).rename(tmp_path / "aside.safetensors")
    with pytest.raises(OneboxError, match="shard .* is missing"):
        load_hf(folder)
    (tmp_path / "aside.safetensors").rename(folder / shards[-1])
    moved = dict(index)
    victim = next(iter(index["weight_map"]))
    moved["weight_map"] = {
        **index["weight_map"],
        victim: shards[-1] if index["weight_map"][victim] != shards[-1] else shards[0],
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(moved))
    with pytest.raises(OneboxError, match="does not hold it"):
        load_hf(folder)
    smaller = {k: v for k, v in index["weight_map"].items() if "k_norm" not in k}
    (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": smaller}))
    with pytest.raises(OneboxError, match="missing .*k_norm"):
        load_hf(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(OneboxError, match="has shape .* by the model's config"):
        model_from_hf(folder)


@pytest.mark.parametrize(
    "name",
    [
        "llama3.2-1b",
        "llama3.1-8b",
        "qwen3-0.6b",
        "qwen3-8b",
        "qwen2.5-7b",
        "mistral-7b",
        "qwen3-30b-a3b",
        "mixtral-8x7b",
    ],
)
def test_the_real_presets_have_their_models_shapes_and_export_as_their_family(name):
    """Parameter counts as published (Llama 3.2 1B: 1.24B, Llama 3.1 8B: 8.03B, Qwen3 0.6B: 0.60B, Qwen3 8B:
    8.19B, Qwen2.5 7B: 7.62B, Mistral 7B: 7.25B), counted exactly, and the family's config.json reads back
    to the same config, which transformers builds with the same parameter count."""
    from onebox.families import config_from_hf, hf_config
    from onebox.presets import preset

    published = {"llama3.2-1b": 1.24, "llama3.1-8b": 8.03, "qwen3-0.6b": 0.60, "qwen3-8b": 8.19}
    published.update({"qwen2.5-7b": 7.62, "mistral-7b": 7.25, "qwen3-30b-a3b": 30.53, "mixtral-8x7b": 46.70})
    active = {"qwen3-30b-a3b": 3.35, "mixtral-8x7b": 12.88}  # Qwen's "3.3B activated", Mistral's "12.9B active"
    config = preset(name)
    model = build_model(config, "meta")
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    assert abs(config.num_params() / 1e9 - published[name]) < 0.01
    assert abs(config.num_active_params() / 1e9 - active.get(name, published[name])) < 0.01
    exported = hf_config(config, "bfloat16", None)
    back = config_from_hf(exported, name)
    assert back.family == config.family and back.head_size == config.head_size
    assert (back.rope_scaling, back.rope_factor, back.qkv_bias, back.qk_norm) == (
        config.rope_scaling,
        config.rope_factor,
        config.qkv_bias,
        config.qk_norm,
    )
    fields = dict(exported)
    hf = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(hf)
    assert sum(p.numel() for p in theirs.parameters()) == config.num_params() + (0 if not config.tie_embeddings else 0)


def test_the_decode_model_says_when_a_kernel_cannot_take_the_models_head_size():
    from onebox.infer.decode import kernel_notes
    from onebox.presets import preset

    assert kernel_notes(preset("qwen3-8b"), ["gemv", "attention", "rope"]) == []  # head size 128
    mistral_test = _reference("mistral").config  # head_dim 24
    config = load_hf_config(mistral_test)
    notes = kernel_notes(config, ["gemv", "attention"])
    assert len(notes) == 1 and "is 24" in notes[0] and kernel_notes(config, ["gemv"]) == []


def load_hf_config(hf_config):
    from onebox.families import config_from_hf

    return config_from_hf(hf_config.to_dict())


def test_the_engine_decodes_a_mixture_of_experts_as_generate_does(family):
    """The serving engine's batched decode (the experts gathered per row) gives each request generate()'s tokens."""
    from onebox.infer.engine import Engine, Request

    name, _, folder = family
    if name not in ("qwen3_moe", "mixtral"):
        pytest.skip("a dense family")
    model, _ = model_from_hf(folder)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]
    expected = [generate(model, p, 8, temperature=0).samples[0] for p in prompts]
    engine = Engine(model, max_batch=3, compile=False)
    requests = engine.submit_all([Request(list(p), 8, temperature=0) for p in prompts])
    while engine.pending or any(engine.slots):
        engine.step()
    assert [list(r.tokens(timeout=1)) for r in requests] == expected


def test_the_router_losses_are_transformers_load_balancing_loss_and_st_moes_z_loss(tmp_path):
    """In training, the loss onebox differentiates adds router_aux_loss_coef x transformers' load-balancing
    loss (computed by transformers itself on the same weights and tokens) and router_z_loss_coef x the mean
    squared logsumexp of the router logits (ST-MoE); the aux weight is imported only where the config asks
    for router logits, as transformers uses it."""
    from onebox.families import config_from_hf
    from onebox.transforms import training_loss

    reference = _reference("qwen3_moe", seed=4)
    reference.save_pretrained(tmp_path / "moe")
    config, state, _ = load_hf(tmp_path / "moe")
    hf = reference.config.to_dict()
    assert (
        config_from_hf({**hf, "output_router_logits": True, "router_aux_loss_coef": 0.05}).router_aux_loss_coef == 0.05
    )
    assert (
        config.router_aux_loss_coef == 0.0
    )  # output_router_logits is off in this config: no aux loss, as in transformers
    x, y = torch.randint(0, 512, (2, 24)), torch.randint(0, 512, (2, 24))

    def extra(**coefs):
        model = build_model(dataclasses.replace(config, **coefs), "cpu", state=state).train()
        logits = []
        for block in model.layers:
            block.mlp.router.register_forward_hook(lambda module, args, out: logits.append(out.detach()))
        loss = training_loss(model, None)(x, y)
        with torch.no_grad():
            plain = torch.nn.functional.cross_entropy(model(x).reshape(-1, 512), y.reshape(-1))
        loss.backward()
        assert model.layers[0].mlp.router.weight.grad.abs().sum() > 0
        return (loss - plain).item(), torch.cat(logits[: len(model.layers)])

    aux, _ = extra(router_aux_loss_coef=0.05)
    with torch.no_grad():
        out = reference.train()(x, output_router_logits=True)
    assert abs(aux - 0.05 * out.aux_loss.item()) < 1e-6 and out.aux_loss.item() > 0
    z, logits = extra(router_z_loss_coef=0.01)
    assert abs(z - 0.01 * torch.logsumexp(logits.float(), dim=-1).square().mean().item()) < 1e-6
    assert extra()[0] == 0.0


@pytest.mark.parametrize(
    "changes",
    [dict(optimizer="muon"), dict(memory="bf16-checkpointed"), dict(memory="checkpointed")],
    ids=["muon", "bf16-checkpointed", "checkpointed"],
)
def test_a_mixture_of_experts_trains_with_the_optimizers_and_memory_strategies(tmp_path, corpus_dir, changes):
    """Stacked experts step with AdamW beside Muon's matrices, in bf16 with stochastic rounding, and with
    activation checkpointing (the router losses recomputed in backward); the loss falls."""
    moe = micro_model(family="qwen3_moe", qk_norm=True, experts=4, experts_per_token=2, expert_hidden=32)
    moe = dataclasses.replace(moe, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    run = micro_train(tmp_path / "run", corpus_dir, max_steps=6, eval_every=0, lr=3e-3, warmup_steps=0, **changes)
    result = train(moe, run, show_progress=False)
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in entries if "loss" in e]
    assert result.step == 6 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def test_a_long_context_model_runs_at_the_context_asked_for_up_to_its_own(tmp_path):
    """An imported model whose context is past 8192 runs at 8192 unless told; --context takes it up to its
    max_position_embeddings (rope tables and KV caches follow), never past it; logits are unchanged."""
    from onebox.infer.generate import load_model, set_context

    torch.manual_seed(0)
    hf = transformers.LlamaConfig(**{**SHAPE, "max_position_embeddings": 16384})
    transformers.LlamaForCausalLM(hf).save_pretrained(tmp_path / "long")
    model, _ = load_model(tmp_path / "long")
    assert (model.config.seq_len, model.config.max_positions) == (8192, 16384)
    idx = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        before = model(idx)
        set_context(model, 12000)
        assert model.config.seq_len == 12000 and model.rope_cos.shape[0] == 12000
        assert model.new_kv_caches(1)[0].k.shape[2] == 12000
        assert torch.equal(model(idx), before)
    with pytest.raises(OneboxError, match="runs at 2 to 16384 tokens"):
        set_context(model, 20000)
    short, _ = load_model(tmp_path / "long", context=100)
    assert short.config.seq_len == 100
