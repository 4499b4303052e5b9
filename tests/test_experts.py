"""Experts beyond device memory: a cache smaller than the experts, fed from host memory or from the model's
files, gives the resident model's tokens; LRU eviction and hit counting; prefetching never changes a result."""

from __future__ import annotations

import pytest
import torch

from onebox.export import model_from_hf
from onebox.infer.experts import ExpertCache, offload_experts
from onebox.infer.generate import generate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        max_position_embeddings=128,
    )
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("moe")
    model.save_pretrained(folder, max_shard_size="60KB")
    return folder


PROMPTS = [[5, 6, 7, 8], [100, 3], [42]]


def _tokens(model):
    return [generate(model, p, 12, temperature=0).samples[0] for p in PROMPTS]


@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_offloaded_experts_give_the_resident_models_tokens(moe_folder, tier, prefetch):
    resident, _ = model_from_hf(moe_folder)
    expected = _tokens(resident)
    model, _ = model_from_hf(moe_folder)
    # 12 of the 24 experts: a token step needs 6 (3 layers x top-2), so recent ones can be hit again
    cache = offload_experts(model, slots=12, folder=moe_folder if tier == "disk" else None, prefetch=prefetch)
    assert not any(hasattr(block.mlp, "gate_up") for block in model.layers)  # the experts left the model
    assert _tokens(model) == expected
    assert cache.misses > 0 and cache.hits + cache.misses > cache.misses and cache.bytes_in > 0
    assert 0 < cache.hit_rate < 1 and (cache.prefetched > 0) == prefetch


def test_a_cache_holding_every_expert_misses_each_once(moe_folder):
    model, _ = model_from_hf(moe_folder)
    cache = offload_experts(model, slots=24)  # 3 layers x 8 experts
    _tokens(model)
    assert cache.misses <= 24 and cache.hits > 0 and len(cache.where) == cache.misses


def test_the_cache_evicts_the_least_recently_used_expert_and_counts_hits():
    loads = []

    def source(layer, expert):
        loads.append((layer, expert))
        return torch.full((4, 2), float(expert)), torch.full((2, 2), float(expert))

    cache = ExpertCache(2, torch.Size([4, 2]), torch.Size([2, 2]), torch.float32, torch.device("cpu"), source)
    assert cache.hit_rate is None
    cache.slots_for(0, [1])
    cache.slots_for(0, [2])
    cache.slots_for(0, [1])  # a hit: expert 1 becomes the most recent
    slot = cache.slots_for(0, [3])[0]  # evicts expert 2, the least recently used
    assert set(cache.where) == {(0, 1), (0, 3)} and cache.gate_up[slot].eq(3.0).all()
    cache.slots_for(0, [1, 2])  # 1 a hit; 2 loaded again, evicting 3 and never 1, which this call needs
    assert set(cache.where) == {(0, 1), (0, 2)} and (cache.hits, cache.misses) == (2, 4)
    assert loads == [(0, 1), (0, 2), (0, 3), (0, 2)] and cache.bytes_in == 4 * (8 + 4) * 4
    cache.prefetch(1, [5])
    assert cache.prefetched == 1 and (cache.hits, cache.misses) == (2, 4)
    with pytest.raises(ValueError):
        ExpertCache(0, torch.Size([4, 2]), torch.Size([2, 2]), torch.float32, torch.device("cpu"), source)


def test_a_cache_smaller_than_one_step_still_gives_the_same_tokens(moe_folder):
    """Two slots for a prefill needing up to 8 experts per layer: they go through the cache in groups."""
    resident, _ = model_from_hf(moe_folder)
    model, _ = model_from_hf(moe_folder)
    cache = offload_experts(model, slots=2)
    assert _tokens(model) == _tokens(resident) and cache.hits == 0  # every layer evicts the last one's: LRU thrashes


def test_generate_with_expert_slots_gives_the_resident_tokens(moe_folder, capsys):
    """`--expert-slots N`: the experts stay in host memory, N on the device at a time; the tokens are the same."""
    from onebox.cli import main
    from onebox.errors import OneboxError
    from onebox.infer.generate import load_model

    args = ["generate", str(moe_folder), "--prompt-ids", "5,6,7", "--temperature", "0", "--max-new-tokens", "8"]
    assert main([*args, "--device", "cpu"]) == 0
    resident = capsys.readouterr().out
    assert main([*args, "--device", "cpu", "--expert-slots", "5"]) == 0
    assert capsys.readouterr().out == resident
    model, _ = load_model(moe_folder, "cpu", expert_slots=5)
    assert model.expert_cache.slots == 5 and not any(hasattr(b.mlp, "gate_up") for b in model.layers)
    with pytest.raises(OneboxError, match="at least one slot"):
        load_model(moe_folder, "cpu", expert_slots=0)


def test_the_caps_choose_the_slots_and_the_tier():
    """Qwen3-30B-A3B in bf16 (57.98 GB of experts, 3.07 GB of the rest): 24 GB of GPU holds what is left of it
    after the rest, the KV cache and the working room; 32 GB of host cannot hold the experts: disk."""
    from onebox.errors import OneboxError
    from onebox.infer.experts import WORKSPACE, place_experts
    from onebox.presets import preset

    config = preset("qwen3-30b-a3b")
    per_expert = 3 * config.dim * config.expert_hidden * 2
    experts = config.layers * config.experts
    dense = config.num_params() * 2 - experts * per_expert
    kv = 2 * config.layers * config.kv_heads * config.head_size * 4096 * 2
    placed = place_experts(config, torch.bfloat16, gpu_memory=24 * 10**9, kv_tokens=4096)
    assert placed.slots == (24 * 10**9 - dense - kv - WORKSPACE) // per_expert and placed.tier == "host"
    assert 0 < placed.slots < experts
    assert place_experts(config, torch.bfloat16, gpu_memory=24 * 10**9, host_memory=32 * 10**9).tier == "disk"
    assert place_experts(config, torch.bfloat16, gpu_memory=80 * 10**9, host_memory=64 * 10**9).tier == "host"
    assert place_experts(config, torch.bfloat16, gpu_memory=141 * 10**9).slots is None  # all resident
    assert place_experts(config, torch.bfloat16, slots=40).slots == 40
    with pytest.raises(OneboxError, match="needs .* GB on the device"):
        place_experts(config, torch.bfloat16, gpu_memory=4 * 10**9)
    with pytest.raises(OneboxError, match="read from disk"):
        place_experts(config, torch.bfloat16, slots=40, host_memory=10**9, has_files=False)


def test_generate_within_gpu_and_host_caps_reads_the_experts_from_disk(moe_folder, capsys, monkeypatch):
    """A device budget for a few experts and a host budget for none: the experts are read from the folder's
    files through the device cache, and the tokens are the resident ones."""
    import onebox.infer.experts as experts_module
    from onebox.cli import main
    from onebox.infer.generate import load_model

    monkeypatch.setattr(experts_module, "WORKSPACE", 0)
    model, _ = load_model(moe_folder, "cpu")
    config = model.config
    per_expert = 3 * config.dim * config.expert_hidden * 4
    dense = config.num_params() * 4 - config.layers * config.experts * per_expert
    kv = 2 * config.layers * config.kv_heads * config.head_size * config.seq_len * 4
    gpu_gb = (dense + kv + 5.5 * per_expert) / 1e9
    args = ["generate", str(moe_folder), "--prompt-ids", "5,6,7", "--temperature", "0", "--max-new-tokens", "8"]
    assert main([*args, "--device", "cpu"]) == 0
    resident = capsys.readouterr().out
    assert main([*args, "--device", "cpu", "--gpu-memory", str(gpu_gb), "--host-memory", "0.000001"]) == 0
    assert capsys.readouterr().out == resident
    capped, _ = load_model(moe_folder, "cpu", gpu_memory=int(gpu_gb * 1e9), host_memory=1000)
    cache = capped.expert_cache
    assert cache.slots == 5 and cache.source.__qualname__.startswith("disk_source")


def test_bench_moe_reports_the_cache_the_bytes_a_token_and_the_baseline(moe_folder, tmp_path, capsys):
    """Disk tier on the CPU: positive decode, a hit rate in (0, 1), bytes read a token, the floor from the
    disk's bandwidth and transformers + accelerate under the same budgets, all in a valid document."""
    pytest.importorskip("accelerate")
    from onebox.bench.schema import read_document, validate_document
    from onebox.cli import main

    out = tmp_path / "moe.json"
    argv = ["bench", "moe", "--model", str(moe_folder), "--device", "cpu", "--expert-slots", "12"]
    argv += ["--host-memory", "0.000001", "--batches", "1,2", "--prompt-len", "8", "--new-tokens", "8"]
    assert main([*argv, "--baseline-tokens", "4", "--out", str(out)]) == 0
    doc = read_document(out)
    assert validate_document(doc) == [] and doc["settings"]["tier"] == "disk" and doc["settings"]["slots"] == 12
    one, two = (entry["result"] for entry in doc["entries"])
    assert one["decode_tokens_per_second"] > 0 and 0 < one["hit_rate"] < 1 and one["bytes_per_token"] > 0
    assert "baseline" not in two and two["floor_tokens_per_second"] > 0  # the disk's bandwidth over the bytes
    assert "hit rate" in capsys.readouterr().out
    baseline = one["baseline"]  # transformers' MoE with its experts on accelerate's disk tier fails (meta tensors)
    speed = baseline["decode_tokens_per_second"]
    assert "max_memory" in baseline["how"] and (speed is None and "failed" in baseline["how"] or speed > 0)
    # without a host budget the baseline holds the model in host memory and runs
    assert (
        main(
            [
                "bench",
                "moe",
                "--model",
                str(moe_folder),
                "--device",
                "cpu",
                "--batches",
                "1",
                "--prompt-len",
                "8",
                "--new-tokens",
                "4",
                "--baseline-tokens",
                "4",
                "--expert-slots",
                "12",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert read_document(out)["entries"][0]["result"]["baseline"]["decode_tokens_per_second"] > 0


def test_bench_moe_refuses_a_dense_preset(capsys):
    from onebox.cli import main

    assert main(["bench", "moe", "--preset", "tiny"]) == 1
    assert "is dense" in capsys.readouterr().err


def test_experts_read_from_disk_are_never_loaded_into_the_model(moe_folder, monkeypatch):
    """On the disk tier the expert stacks are left unallocated when the model is built: none is read then."""
    from onebox.export import SafetensorsState
    from onebox.infer.generate import load_model

    asked = []
    original = SafetensorsState.__getitem__
    monkeypatch.setattr(SafetensorsState, "__getitem__", lambda self, name: asked.append(name) or original(self, name))
    model, _ = load_model(moe_folder, "cpu", expert_slots=4, host_memory=1000)
    assert asked and not any(name.endswith(("mlp.gate_up", "mlp.down")) for name in asked)
    assert model.expert_cache.tier == "disk"
    asked.clear()
    load_model(moe_folder, "cpu", expert_slots=4)  # the host tier reads them once, into host memory
    assert any(name.endswith("mlp.gate_up") for name in asked)


@pytest.mark.parametrize("cold", ["host", "auto"])
def test_cold_experts_computed_on_the_host_give_the_resident_tokens(moe_folder, cold):
    """host: every expert not on the device is computed where it lives and never copied; auto: chosen by the
    times measured at start, the tokens the same either way."""
    resident, _ = model_from_hf(moe_folder)
    expected = _tokens(resident)
    model, _ = model_from_hf(moe_folder)
    cache = offload_experts(model, slots=6, cold=cold)
    assert _tokens(model) == expected
    if cold == "host":
        assert cache.computed_on_host > 0 and cache.bytes_in == 0 and cache.misses == 0
    else:
        assert cache.copy_seconds > 0 and all(t > 0 for t in cache.host_seconds)
        assert cache.computed_on_host + cache.misses > 0


def test_cold_experts_is_checked():
    from onebox.errors import OneboxError

    with pytest.raises(OneboxError, match="--cold-experts"):
        offload_experts(torch.nn.Module(), slots=2, cold="gpu")


def test_bench_moe_hands_out_the_document_after_each_batch_and_samples(moe_folder):
    """A run cut short keeps what it measured: `partial` sees the document after every batch; the decode samples
    (a greedy decode of random weights repeats its routing, which would flatter the cache)."""
    from onebox.bench.moe import run_moe

    seen = []
    budgets = {"expert_slots": 12, "gpu_memory": None, "host_memory": None}
    doc = run_moe(
        moe_folder,
        torch.device("cpu"),
        lambda line: None,
        [1, 2],
        budgets,
        8,
        8,
        None,
        partial=lambda d: seen.append(len(d["entries"])),
    )
    assert seen == [1, 2] and doc["settings"]["temperature"] == 1.0
    assert all("baseline" not in e["result"] for e in doc["entries"])
