"""CUDA-only checks (skipped without a GPU): bf16 autocast training, compile, cached decode on device."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_model, micro_train

from onebox.infer.generate import generate
from onebox.model import Transformer, cross_entropy_loss
from onebox.training import train

pytestmark = pytest.mark.gpu


def test_bf16_compiled_training_on_cuda_tracks_fp32_cpu(tmp_path, corpus_dir):
    common = dict(max_steps=30, eval_every=0, ckpt_every=0, log_every=1)
    train(
        micro_model(),
        micro_train(tmp_path / "gpu", corpus_dir, device="cuda", compile="on", **common),
        show_progress=False,
    )
    train(micro_model(), micro_train(tmp_path / "cpu", corpus_dir, device="cpu", **common), show_progress=False)
    import json

    def losses(d):
        entries = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [e["loss"] for e in entries if "loss" in e]

    gpu, cpu = losses(tmp_path / "gpu"), losses(tmp_path / "cpu")
    assert gpu[-1] < gpu[0] - 0.5
    # bf16 matmuls against fp32: the curves agree to a few percent.
    assert all(abs(g - c) / c < 0.03 for g, c in zip(gpu, cpu)), (gpu, cpu)


def test_flash_attention_path_matches_cpu_reference():
    torch.manual_seed(0)
    config = micro_model(dim=256, heads=2, kv_heads=2, seq_len=128, hidden=512)
    model = Transformer(config)
    idx = torch.randint(0, 512, (2, 128))
    with torch.no_grad():
        ref = model(idx)
        model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(idx.cuda()).float().cpu()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 2e-2  # bf16 operands


def test_cached_greedy_equals_uncached_on_cuda():
    torch.manual_seed(1)
    model = Transformer(micro_model(seq_len=96)).cuda().eval()
    prompt = torch.randint(0, 512, (9,)).tolist()
    assert (
        generate(model, prompt, 30, temperature=0).samples
        == generate(model, prompt, 30, temperature=0, use_cache=False).samples
    )


def test_loss_backward_runs_under_bf16_autocast():
    model = Transformer(micro_model()).cuda()
    idx = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = cross_entropy_loss(model(idx), idx)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("memory", ["bf16-checkpointed", "offload"])
def test_low_memory_strategies_on_cuda_track_the_standard_one(tmp_path, corpus_dir, memory):
    import json

    common = dict(max_steps=40, eval_every=0, ckpt_every=0, log_every=10, device="cuda", compile="on")
    train(micro_model(), micro_train(tmp_path / "std", corpus_dir, memory="standard", **common), show_progress=False)
    train(micro_model(), micro_train(tmp_path / "low", corpus_dir, memory=memory, **common), show_progress=False)

    def losses(d):
        return {
            e["step"]: e["loss"] for e in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in e
        }

    std, low = losses(tmp_path / "std"), losses(tmp_path / "low")
    assert std[40] < std[10] - 0.5
    assert all(abs(low[s] - std[s]) / std[s] < 0.03 for s in std), (std, low)


def test_pinned_zeros_are_page_locked_exactly_sized_and_copy_both_ways():
    from onebox.host import pinned_zeros

    host = pinned_zeros((3, 1000, 333), torch.bfloat16)  # not a power of two, not a whole number of pages
    assert host.is_pinned() and host.shape == (3, 1000, 333) and not host.any()
    values = torch.randn(3, 1000, 333, device="cuda").bfloat16()
    host.copy_(values, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(host.cuda(non_blocking=True), values)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL: one process per GPU)")
@pytest.mark.parametrize("memory", ["bf16", "offload-int8"])
def test_sharded_low_memory_strategies_on_two_gpus_track_one_and_resume(tmp_path, corpus_dir, memory):
    """The update inside backward on FSDP2 shards, on CUDA streams (the hooks run on FSDP2's reduce-scatter
    stream), and the 8-bit moments' sharded checkpoint (rows of whole 256-blocks at dim 256, hidden 512)."""
    import json

    from onebox.cli import main

    shape = [
        "--vocab-size",
        "512",
        "--dim",
        "256",
        "--hidden",
        "512",
        "--layers",
        "2",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--seq-len",
        "64",
    ]

    def run(out, *extra):
        return main(
            [
                "train",
                *shape,
                "--data",
                str(corpus_dir),
                "--device",
                "cuda",
                "--max-steps",
                "30",
                "--lr",
                "3e-3",
                "--warmup-steps",
                "5",
                "--eval-every",
                "0",
                "--ckpt-every",
                "20",
                "--log-every",
                "1",
                "--quiet",
                "--memory",
                memory,
                "--out-dir",
                str(out),
                *extra,
            ]
        )

    def losses(d):
        return {
            e["step"]: e["loss"] for e in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in e
        }

    assert run(tmp_path / "one", "--batch-size", "8") == 0
    assert run(tmp_path / "two", "--batch-size", "4", "--gpus", "2") == 0
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert two[30] < two[1] - 0.5
    # Stochastic rounding draws different noise on 1 and 2 processes, so single steps drift apart
    # (seen up to >3% by step 30 at lr 3e-3); the first steps agree closely and 5-step means stay within 3%.
    assert all(abs(one[s] - two[s]) / one[s] < 0.01 for s in range(1, 6)), (one, two)
    windows = [range(start, start + 5) for start in range(1, 31, 5)]
    means = [(sum(one[s] for s in w) / 5, sum(two[s] for s in w) / 5) for w in windows]
    assert all(abs(a - b) / a < 0.03 for a, b in means), means
    assert (
        main(
            [
                "train",
                "--resume",
                str(tmp_path / "two" / "ckpt_0000020.pt"),
                "--out-dir",
                str(tmp_path / "again"),
                "--gpus",
                "2",
                "--device",
                "cuda",
                "--quiet",
            ]
        )
        == 0
    )
    again = losses(tmp_path / "again")
    assert abs(again[21] - two[21]) / two[21] < 1e-3, (again, two)  # the same weights and moments came back
    for w in (
        range(21, 26),
        range(26, 31),
    ):  # the resumed first step only measures the norm: then they drift like above
        assert abs(sum(again[s] for s in w) - sum(two[s] for s in w)) / sum(two[s] for s in w) < 0.03, (again, two)


@pytest.mark.parametrize("n,k", [(4608, 1536), (1536, 1536), (8192, 2560), (2560, 6912), (1000, 777)])
def test_triton_gemv_matches_the_reference_in_bf16(n, k):
    """The decode GEMV against an fp32 reference on random bf16 inputs: within one bf16 rounding of the
    output (2^-8 relative) plus accumulation-order noise, and as close as cuBLAS's F.linear (both round the
    fp32 sum to bf16 once), launched plainly and (Hopper and later) with programmatic dependent launch.
    Odd sizes exercise the row and column masks."""
    from onebox.infer import kernels

    torch.manual_seed(n + k)
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    assert kernels.usable(x, w)
    levels = [0] + ([kernels.LAUNCH, kernels.LAUNCH | kernels.CHAIN] if kernels.pdl_available(x.device) else [])
    ref = x.float() @ w.float().T
    cublas = torch.nn.functional.linear(x, w).float()
    scale = ref.abs().max().item()
    for level in levels:
        got = kernels.gemv(x, w, pdl=level).float()
        torch.testing.assert_close(got, ref, rtol=2**-7, atol=2e-3 * scale)
        assert (got - ref).norm() <= 1.5 * (cublas - ref).norm() + 1e-6 * scale


@pytest.mark.parametrize("batch,heads,kv_heads,slots", [(1, 20, 20, 512), (8, 12, 12, 512), (3, 8, 2, 200)])
def test_decode_attention_matches_sdpa_under_the_mask(batch, heads, kv_heads, slots):
    """Flash-decoding over each row's filled cache against SDPA over the whole cache under the causal mask
    (onebox.model.cached_attention), bf16 inputs: within 2e-2 of the output's scale (bf16 probabilities in
    SDPA's kernel, fp32 here). Rows at different positions, one at position 0, one in the last slot; grouped
    heads; a cache length that is not a multiple of the chunk."""
    from onebox.infer import kernels
    from onebox.model import cached_attention

    torch.manual_seed(batch * heads + slots)
    q = torch.randn(batch, 1, heads, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # the model's layout
    k = torch.randn(batch, kv_heads, slots, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, slots, 128, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, slots, (batch, 1), device="cuda")
    positions[0, 0] = 0
    positions[-1, 0] = slots - 1
    assert kernels.attention_usable(q, k)
    for input_pos in (positions, positions[0, :]):  # per row, and one position for all rows
        ref = cached_attention(q, k, v, input_pos).float()
        for counts in (
            None,
            torch.zeros(batch, heads, dtype=torch.int32, device="cuda"),
        ):  # a merge kernel, or the last chunk merges
            for _ in range(2):  # twice: the counters are left ready for the next step
                got = kernels.decode_attention(q, k, v, input_pos, counts=counts).float()
                assert got.shape == ref.shape
                torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
            assert counts is None or not counts.any()


@pytest.mark.parametrize("batch,heads,kv_heads,slots", [(1, 20, 20, 512), (3, 8, 2, 200)])
def test_rope_decode_attention_matches_rotate_write_attend(batch, heads, kv_heads, slots):
    """RoPE and the cache write folded into the attention kernel against model.rope_cached_attention (rotate
    in bf16, write, SDPA under the mask): output within 2e-2 of its scale, the cache written at each row's
    position within one bf16 unit of the rotation's products and nowhere else; per-row and shared positions."""
    from onebox.infer import kernels
    from onebox.infer.decode import DecodeKVCache
    from onebox.model import KVCache, rope_cached_attention, rope_tables

    torch.manual_seed(batch * heads + slots)
    dim = 128
    cos_table, sin_table = rope_tables(slots, dim, 10000.0, torch.device("cuda"))
    for shared in (False, True):
        qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
        q, k, v = (
            t.view(batch, 1, -1, dim).transpose(1, 2)
            for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        )
        positions = torch.randint(1, slots, (batch, 1), device="cuda")
        positions[0, 0], positions[-1, 0] = 0, slots - 1
        input_pos = positions[-1, :] if shared else positions
        # with one counter per query head the chunks merge themselves; with one per key/value head (GQA) the merge kernel runs
        ours = DecodeKVCache(batch, heads if shared else kv_heads, kv_heads, slots, dim, torch.bfloat16, "cuda")
        ref = KVCache(batch, kv_heads, slots, dim, torch.bfloat16, "cuda")
        ours.k.normal_(), ours.v.normal_()
        ref.k.copy_(ours.k), ref.v.copy_(ours.v)
        before = ours.k.clone()
        cos, sin = cos_table[input_pos], sin_table[input_pos]
        want = rope_cached_attention(q, k, v, cos, sin, ref, input_pos).float()
        counts = ours.counts if ours.counts.numel() == batch * heads else None
        got = kernels.rope_decode_attention(
            q, k, v, cos, sin, ours.k, ours.v, input_pos, counts=counts
        ).float()  # the kernel itself
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        assert torch.equal(ours.v, ref.v) and not ours.counts.any()
        # on an H100, 89 of 153,600 values came out one bf16 unit of the rotation's products apart from
        # torch's (at most 2**-6, where products near 2-4 nearly cancel): allowed at the products' scale, not the result's
        torch.testing.assert_close(ours.k.float(), ref.k.float(), rtol=2**-8, atol=2**-7 * k.abs().max().item())
        changed = (ours.k != before).any(dim=-1)  # (batch, kv_heads, slots): only each row's own position
        assert all(
            set(changed[row].nonzero()[:, 1].tolist()) <= {int(input_pos.reshape(-1)[min(row, input_pos.numel() - 1)])}
            for row in range(batch)
        )


@pytest.mark.parametrize(
    "rows,kernels_",
    [
        (2, "gemv,attention"),
        (1, "gemv,attention"),
        (1, "gemv,attention,pdl"),
        (2, "gemv,attention,rope"),
        (1, "gemv,attention,rope,pdl"),
        (1, "gemv,attention,chain"),
        (1, "gemv,attention,rope,chain"),
        (2, "gemv,attention,rope,chain"),
    ],
)
def test_decode_kernels_inside_a_compiled_cuda_graph_decode_step(rows, kernels_):
    """The decode model (infer.decode.to_decode) under torch.compile with CUDA graphs (reduce-overhead,
    fullgraph), as the engine runs it: a bf16 model's one-token logits equal the plain model's within bf16
    tolerance, at five positions (two rows: attention only; one row: the GEMVs too; with programmatic
    dependent launch, RoPE and the cache write folded into attention, that attention launched with PDL
    too), and prefill (many rows) is untouched."""
    from onebox.infer import kernels
    from onebox.infer.decode import to_decode

    torch._dynamo.reset()  # one code object (the lambda below) per case: past 8 cases dynamo's recompile limit would fail the run
    torch.manual_seed(3)
    config = micro_model(dim=256, heads=2, kv_heads=1, seq_len=160, hidden=768)
    ref_model = Transformer(config).cuda().to(torch.bfloat16).eval()
    if ("pdl" in kernels_ or "chain" in kernels_) and not kernels.pdl_available(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper or later GPU")
    model = to_decode(ref_model, kernels_)
    assert sorted(model.kernels) == sorted(set(kernels_.split(",")) | ({"pdl"} if "chain" in kernels_ else set()))
    ids = torch.randint(0, 512, (rows, 100), device="cuda")
    with torch.inference_mode():
        caches, ref_caches = model.new_kv_caches(rows), ref_model.new_kv_caches(rows)
        prompt = torch.arange(90, device="cuda")
        assert torch.equal(model(ids[:, :90], prompt, caches), ref_model(ids[:, :90], prompt, ref_caches))
        for buffer in (
            b for cache in caches for b in cache.buffers()
        ):  # k, v and the attention's counters, as the Engine marks them
            torch._dynamo.mark_static_address(buffer)
        step = torch.compile(lambda t, p: model(t, p, caches), mode="reduce-overhead", fullgraph=True)
        for position in (90, 91, 92, 93, 94):  # warm-up and capture, then replays
            pos = torch.tensor([[position], [position - 20]][:rows], device="cuda")
            out = step(ids[:, position : position + 1], pos).clone()
            ref = ref_model(ids[:, position : position + 1], pos, ref_caches)
            torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_bench_ceiling_with_a_memory_cap_on_device_auto(tmp_path, capsys):
    from onebox.bench.schema import read_document
    from onebox.cli import main

    out = tmp_path / "ceiling.json"
    assert main(["bench", "ceiling", "--ladder", "tiny", "--gpu-memory", "8", "--steps", "2", "--out", str(out)]) == 0
    entry = read_document(out)["entries"][0]
    assert entry["result"]["status"] == "ok" and entry["result"]["peak_memory_bytes"] < 8e9
    assert "Traceback" not in capsys.readouterr().err


def test_the_transformers_decode_baseline_runs_both_caches_on_cuda():
    from onebox.bench.decode import HF_CACHES, hf_baseline, hf_generate_speed
    from onebox.model import build_model
    from onebox.presets import preset

    model = build_model(preset("tiny"), torch.device("cuda"), torch.bfloat16).eval()
    baseline = hf_baseline(model)
    speeds = {cache: hf_generate_speed(baseline, model.config, 2, 16, 8, cache) for cache in HF_CACHES}
    assert all(speed > 0 for speed in speeds.values()), speeds


def _moe_model(device: str = "cuda"):
    """A small Qwen3-MoE with weights large enough that greedy choices are clear-cut (fp32)."""
    from onebox.model import build_model
    from onebox.presets import preset

    torch.manual_seed(3)
    model = build_model(preset("qwen3-moe-tiny"), torch.device(device), torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return model


MOE_PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]


def test_a_mixture_of_experts_decodes_under_cuda_graphs_as_generate_does():
    """The engine's compiled decode step (CUDA graphs, experts gathered per row) gives generate()'s tokens."""
    from onebox.infer.engine import Engine, Request

    model = _moe_model()
    expected = [generate(model, p, 10, temperature=0).samples[0] for p in MOE_PROMPTS]
    engine = Engine(model, max_batch=3)
    assert engine._decode is not engine._decode_eager  # compiled (CUDA graphs)
    requests = engine.submit_all([Request(list(p), 10, temperature=0) for p in MOE_PROMPTS])
    while engine.pending or any(engine.slots):
        engine.step()
    assert [list(r.tokens(timeout=5)) for r in requests] == expected


def test_experts_offloaded_to_pinned_host_memory_give_the_resident_tokens_on_cuda():
    from onebox.infer.experts import offload_experts

    resident = _moe_model("cpu").cuda()  # both drawn on the CPU: the same weights
    expected = [generate(resident, p, 10, temperature=0).samples[0] for p in MOE_PROMPTS]
    model = _moe_model("cpu")
    cache = offload_experts(model, slots=12, prefetch=True, device="cuda")
    model.to("cuda")
    assert [generate(model, p, 10, temperature=0).samples[0] for p in MOE_PROMPTS] == expected
    assert cache.misses > 0 and cache.prefetched > 0 and 0 < cache.hit_rate < 1


def test_the_grouped_gemm_experts_equal_the_looped_ones_in_bf16_on_cuda():
    """Forward and backward under bf16 autocast on the GPU: relative error <= 2e-2 against the looped path."""
    from onebox.moe import MoE, grouped_mm_runs
    from onebox.presets import preset

    if not grouped_mm_runs(torch.device("cuda"), torch.bfloat16):
        pytest.skip("no grouped GEMM for this GPU")
    torch.manual_seed(0)
    block = MoE(preset("qwen3-moe-tiny")).cuda()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.05)
    x = torch.randn(300, 256, device="cuda")
    results = []
    for path in ("grouped", "looped"):
        block.zero_grad()
        xin = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            chosen, weights = block.route(xin)
            out = getattr(block, path)(xin, chosen, weights)
        out.float().square().sum().backward()
        results.append([out.float(), xin.grad, block.gate_up.grad, block.down.grad])
    for got, want in zip(*results):
        assert (got - want).norm() / want.norm() < 2e-2


def test_load_model_pages_experts_from_pinned_host_memory_on_cuda(tmp_path):
    """--expert-slots on a GPU: the experts are built straight into pinned host memory (no staging copy) and
    the tokens are the resident model's."""
    from onebox.export import export_hf
    from onebox.infer.generate import load_model

    model = _moe_model("cpu")
    export_hf(model.state_dict(), model.config, None, tmp_path / "moe")
    expected = [generate(model.cuda(), p, 10, temperature=0).samples[0] for p in MOE_PROMPTS]
    paged, _ = load_model(tmp_path / "moe", "cuda", expert_slots=12)
    assert [generate(paged, p, 10, temperature=0).samples[0] for p in MOE_PROMPTS] == expected
    gate_up, down = paged.expert_cache.source(0, 0)
    assert gate_up.is_pinned() and down.is_pinned() and paged.embed_tokens.weight.is_cuda


@pytest.mark.parametrize(
    "count,n,k,per_row", [(128, 1536, 2048, 8), (128, 2048, 768, 1), (8, 28672, 4096, 2), (5, 100, 777, 3)]
)
def test_the_expert_kernel_matches_the_gathered_reference_in_bf16(count, n, k, per_row):
    """Each pair's product with its expert read in place, and the SwiGLU form, against fp32 products of the
    gathered weights: within one bf16 rounding (two for the gate and up, one for their product)."""
    from onebox.infer.kernels import experts

    torch.manual_seed(count + n)
    stack = torch.randn(count, n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, count, (4 * per_row,), device="cuda")
    assert experts.usable(x, stack)
    for swiglu in (False, True):
        got, ref = (
            experts.expert_products(x, stack, index, per_row, swiglu),
            experts.reference(x, stack, index, per_row, swiglu),
        )
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-6 if swiglu else 2**-7, atol=2e-3 * scale)


def _decode_errors(model, ref_model, ids, compiled: bool) -> list[float]:
    """Norm-relative error of `model`'s one-token logits against the eager `ref_model`'s at five positions
    after a 30-token prefill (two rows at different positions), each with fresh caches."""
    errors = []
    with torch.inference_mode():
        caches, ref_caches = model.new_kv_caches(2), ref_model.new_kv_caches(2)
        prompt = torch.arange(30, device="cuda")
        model(ids[:, :30], prompt, caches), ref_model(ids[:, :30], prompt, ref_caches)
        step = lambda t, p: model(t, p, caches)
        if compiled:
            torch._dynamo.reset()
            for buffer in (b for cache in caches for b in cache.buffers()):
                torch._dynamo.mark_static_address(buffer)
            step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        for position in range(30, 35):
            pos = torch.tensor([[position], [position - 5]], device="cuda")
            out = step(ids[:, position : position + 1], pos).clone().float()
            ref = ref_model(ids[:, position : position + 1], pos, ref_caches).float()
            errors.append(((out - ref).norm() / ref.norm()).item())
    return errors


def test_a_bf16_mixture_of_experts_decode_step_through_the_expert_kernel_in_a_cuda_graph():
    """The decode model of a bf16 MoE (its experts through the expert kernel): eager, its one-token logits are
    the plain model's within bf16 tolerance; compiled with CUDA graphs (reduce-overhead) as the engine runs it,
    no further from the eager plain model than the plain model compiled the same way is. Medians over five
    positions: in bf16 a near-tie in a router now and then picks another expert (as between any two bf16
    computations of the model, compiled or not), which moves that position's logits by tens of percent."""
    from onebox.infer.decode import DecodeMoE, to_decode

    ref_model = _moe_model().to(torch.bfloat16)
    model = to_decode(ref_model, "gemv,attention")
    assert all(isinstance(block.mlp, DecodeMoE) for block in model.layers)
    ids = torch.randint(0, 100, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    eager = _decode_errors(model, ref_model, ids, compiled=False)
    assert sorted(eager)[2] < 3e-2, eager
    kernel = _decode_errors(model, ref_model, ids, compiled=True)
    plain = _decode_errors(to_decode(ref_model, False), ref_model, ids, compiled=True)
    assert sorted(kernel)[2] <= 1.5 * sorted(plain)[2] + 5e-3, (kernel, plain)


def test_offloaded_bf16_experts_decode_through_the_expert_kernel_with_the_resident_tokens():
    """In bf16 on the GPU an offloaded MoE's decode steps multiply the cache's slots through the expert kernel
    (indexed by slot), the resident decode model its own stack through the same kernel: the same tokens."""
    from onebox.infer.decode import to_decode
    from onebox.infer.experts import offload_experts

    prompts = [[5], [9], [20]]  # one token: the prefill is a decode-sized step too, through the same kernel
    resident = to_decode(_moe_model("cpu").to(torch.bfloat16).cuda(), "gemv")
    expected = [generate(resident, p, 10, temperature=0).samples[0] for p in prompts]
    model = _moe_model("cpu").to(torch.bfloat16)
    cache = offload_experts(model, slots=12, prefetch=True, device="cuda")
    model = to_decode(model.to("cuda"), "gemv")  # the same attention products as the resident decode model
    assert [generate(model, p, 10, temperature=0).samples[0] for p in prompts] == expected
    assert cache.misses > 0 and 0 < cache.hit_rate < 1
