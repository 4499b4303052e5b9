"""onebox's Triton decode kernels (infer/kernels/) against their reference computations on random
inputs, on the CPU through Triton's interpreter (TRITON_INTERPRET=1, in a fresh process: the variable
is read when the kernels are defined). The same comparisons run compiled on CUDA in tests/test_gpu.py;
this one keeps them in CI, which has no GPU. Tolerances (bf16 inputs): products within one bf16
rounding of the output (2^-7 relative) plus 2e-3 of the output's scale for accumulation order;
attention within 2e-2 of the output's scale (SDPA's kernels round probabilities to bf16); and the
error's norm under 6e-3 of the output's (a bias of a few tenths of a percent passes the element-wise
bounds, not this). The interpreter rounds fp32 to bf16 toward zero where GPUs round to nearest, so the
reference of RoPE folded into attention rounds its bf16 steps toward zero too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (it comes with the dev extras on Linux x86-64)")
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
    pytest.skip(
        f"Triton {triton.__version__}'s interpreter fails under numpy 2.3+ (3.7 or later needed)",
        allow_module_level=True,
    )

SCRIPT = textwrap.dedent("""
    import torch
    from onebox.infer import kernels
    from onebox.model import KVCache, cached_attention, rope_tables

    def close(got, ref, rtol, atol, what):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
        share = ((got - ref).norm() / ref.norm()).item()
        assert share <= 6e-3, f"{what}: error {share:.2e} of the output's norm (at most 6e-3)"

    def toward_zero(t):  # fp32 -> bf16 -> fp32 as the interpreter rounds: the low 16 bits dropped
        return (t.float().view(torch.int32) & -65536).view(torch.float32)

    torch.manual_seed(0)
    for n, k in [(100, 777), (64, 1536), (7, 2048)]:  # ragged rows and columns, several column blocks
        x = torch.randn(1, 1, k, dtype=torch.bfloat16)
        w = torch.randn(n, k, dtype=torch.bfloat16)
        got, ref = kernels.gemv(x, w), x.float() @ w.float().T
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        close(got.float(), ref, 2**-7, 2e-3 * ref.abs().max().item(), f"gemv {n}x{k}")
    for batch, heads, kv_heads, slots in [(1, 4, 4, 130), (3, 8, 2, 200)]:
        q = torch.randn(batch, 1, heads, 64, dtype=torch.bfloat16).transpose(1, 2)  # the model's layout
        k = torch.randn(batch, kv_heads, slots, 64, dtype=torch.bfloat16)
        v = torch.randn(batch, kv_heads, slots, 64, dtype=torch.bfloat16)
        positions = torch.randint(0, slots, (batch, 1))
        positions[0, 0], positions[-1, 0] = 0, slots - 1  # the first position alone, and the last slot
        for input_pos in (positions, positions[-1, :]):  # per row, and one position for all rows
            ref = cached_attention(q, k, v, input_pos).float()
            for chunk, merged in ((16, False), (kernels.ATTN_CHUNK, False), (16, True), (64, True)):  # V with K or after; merge kernel or merged in
                counts = torch.zeros(batch, heads, dtype=torch.int32) if merged else None
                got = kernels.decode_attention(q, k, v, input_pos, chunk=chunk, counts=counts).float()
                assert got.shape == ref.shape
                close(got, ref, 2e-2, 2e-2 * ref.abs().max().item(), f"attention {batch}x{heads}/{kv_heads}x{slots} chunk {chunk} merged {merged}")
                assert counts is None or not counts.any(), "the counters are left at zero for the next step"
    def rope_toward_zero(x, cos, sin):  # model.apply_rope with the interpreter's roundings
        cos, sin = toward_zero(cos), toward_zero(sin)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        first, second = x.float().chunk(2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
        return toward_zero(toward_zero(x.float() * cos) + toward_zero(rotated * sin)).to(x.dtype)

    for batch, heads, kv_heads, slots, shared in [(1, 4, 4, 130, False), (3, 8, 2, 200, False), (2, 4, 2, 96, True)]:
        # RoPE and the cache write folded into attention, against rotate, write, attend (model.rope_cached_attention)
        dim = 64
        qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * dim, dtype=torch.bfloat16)
        q, k, v = (t.view(batch, 1, -1, dim).transpose(1, 2) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
        cos_table, sin_table = rope_tables(slots, dim, 10000.0)
        positions = torch.randint(1, slots, (batch, 1))
        positions[0, 0], positions[-1, 0] = 0, slots - 1  # the first position alone, and the last slot
        input_pos = positions[-1, :] if shared else positions
        cos, sin = cos_table[input_pos], sin_table[input_pos]
        start = KVCache(batch, kv_heads, slots, dim, torch.bfloat16, "cpu")
        start.k.normal_(), start.v.normal_()
        ref = KVCache(batch, kv_heads, slots, dim, torch.bfloat16, "cpu")
        ref.k.copy_(start.k), ref.v.copy_(start.v)
        cached_k, cached_v = ref.update(input_pos, rope_toward_zero(k, cos, sin), v)
        want = cached_attention(rope_toward_zero(q, cos, sin), cached_k, cached_v, input_pos).float()
        for chunk, merged in ((16, True), (64, False)):  # V loaded with K, and after its scores; merged in, or by a second kernel
            cache_k, cache_v = start.k.clone(), start.v.clone()
            counts = torch.zeros(batch, heads, dtype=torch.int32) if merged else None
            got = kernels.rope_decode_attention(q, k, v, cos, sin, cache_k, cache_v, input_pos, chunk=chunk, counts=counts).float()
            what = f"rope attention {batch}x{heads}/{kv_heads}x{slots}{' shared' if shared else ''} chunk {chunk} merged {merged}"
            close(got, want, 2e-2, 2e-2 * want.abs().max().item(), what)
            # the cache: this step's k (rotated) and v written where the reference writes them, bit for bit, nothing else touched
            assert torch.equal(cache_k, ref.k) and torch.equal(cache_v, ref.v), what
    from onebox.infer.kernels import experts
    from onebox.moe import MoE
    from onebox.config import ModelConfig
    for count, n, k, per_row in [(5, 100, 777, 2), (3, 96, 256, 1), (4, 64, 768, 3)]:  # ragged, one and several column blocks
        stack = torch.randn(count, n, k, dtype=torch.bfloat16)
        index = torch.randint(0, count, (6 * per_row,))
        x = torch.randn(6, k, dtype=torch.bfloat16)
        for swiglu in (False, True):
            got, ref = experts.expert_products(x, stack, index, per_row, swiglu), experts.reference(x, stack, index, per_row, swiglu)
            assert got.shape == ref.shape == (index.numel(), n // 2 if swiglu else n)
            if swiglu:  # gate, up and their product each rounded to bf16 (toward zero here): three roundings
                ref = experts.reference(x.float(), stack.float(), index, per_row, False)
                gate, up = (toward_zero(part) for part in ref.chunk(2, dim=-1))
                ref = toward_zero(gate * torch.sigmoid(gate) * up).to(torch.bfloat16)
            close(got.float(), ref.float(), 2**-6, 2e-3 * ref.float().abs().max().item(), f"experts {n}x{k} swiglu {swiglu}")
    # a decode step's experts against the gathered reference of the model's own MoE
    config = ModelConfig(name="m", vocab_size=32, dim=256, layers=1, heads=4, kv_heads=2, hidden=512, seq_len=16,
                         experts=8, experts_per_token=2, expert_hidden=96)
    block = MoE(config).to(torch.bfloat16)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    chosen, weights = block.route(x)
    got = experts.moe_decode(x, block.gate_up.data, block.down.data, chosen, weights).float()
    ref = block.float().gathered(x.float(), chosen, weights.float())  # fp32 throughout
    # five bf16 roundings in the chain (gate, up, hidden, output, mix), toward zero here: the wiring (indices, rows, mixing) is what this checks
    share = ((got - ref).norm() / ref.norm()).item()
    assert share < 2e-2, f"moe decode: error {share:.2e} of the output's norm (at most 2e-2)"
    print("kernels match")
""")


def test_decode_kernels_match_their_references_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "kernels match" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]


def _signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Every argument of a Triton kernel typed: the named pointers as given, constexprs as such, the rest i32 (fp32 for eps/scale)."""
    names = kernel.arg_names
    return {
        n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in ("eps", "scale") else "i32")
        for n in names
    }


def test_decode_kernels_compile_for_hopper_without_spilling():
    """The paths the interpreter cannot run (programmatic dependent launch: `gdc_wait`, `gdc_launch_dependents`)
    compile for an H100 (sm_90) on this CPU-only machine with Triton's own ptxas, in every configuration the
    launchers use, and no kernel spills registers to the stack (the folded RoPE attention did at 4 warps)."""
    import tempfile
    from pathlib import Path

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from onebox.infer import kernels as K

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("this Triton has no bundled CUDA tools")

    def compiled(kernel, pointers, constexprs, **options):
        source = ASTSource(fn=kernel, signature=_signature(kernel, pointers, constexprs), constexprs=constexprs)
        binary = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(binary.asm["cubin"])
            cubin.flush()
            usage = subprocess.run(
                [str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
            ).stdout
        assert "STACK:0" in usage and "LOCAL:0" in usage, f"{kernel.fn.__name__} {constexprs} spills: {usage}"
        return binary.asm["ptx"]

    bf16 = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16"}
    from onebox.infer.kernels import matvec as gemv_module

    for n in (1536, 4608):  # both warp counts
        for pdl, chained in ((False, False), (True, False), (True, True)):  # off, LAUNCH, LAUNCH | CHAIN
            ptx = compiled(
                gemv_module._gemv_kernel,
                bf16,
                {"BLOCK_N": K.BLOCK_N, "BLOCK_K": K.BLOCK_K, "PDL": pdl, "CHAINED": chained},
                num_warps=K.gemv_warps(n),
                launch_pdl=pdl,
            )
            assert ("griddepcontrol.wait" in ptx) == pdl and ("griddepcontrol.launch_dependents" in ptx) == chained
    from onebox.infer.kernels import experts as experts_module

    for swiglu in (False, True):
        for block_k in (256, 512):
            compiled(
                experts_module._expert_kernel,
                {**bf16, "index_ptr": "*i64"},
                {"PER_ROW": 8, "SWIGLU": swiglu, "BLOCK_N": experts_module.BLOCK_N, "BLOCK_K": block_k},
                num_warps=4,
            )
    from onebox.infer.kernels import flash_decode as attention_module

    pointers = {
        "q_ptr": "*bf16",
        "k_ptr": "*bf16",
        "v_ptr": "*bf16",
        "kn_ptr": "*bf16",
        "vn_ptr": "*bf16",
        "pos_ptr": "*i64",
        "part_ptr": "*fp32",
        "stat_ptr": "*fp32",
        "cos_ptr": "*fp32",
        "sin_ptr": "*fp32",
        "o_ptr": "*bf16",
    }
    pointers["count_ptr"] = "*i32"
    chunk = K.ATTN_CHUNK
    for dim in (64, 128):
        for warps in sorted({K.attention_launch(rows)[1] for rows in (1, 8)}):
            for rope in (False, True):
                # chunks merged by the last to finish (an atomic ticket), or by the merge kernel; CHAIN: launched with PDL
                for merge, pdl in ((False, False), (True, False), (True, rope)):
                    ptx = compiled(
                        attention_module._attention_chunk_kernel,
                        pointers,
                        {
                            "D": dim,
                            "CHUNK": chunk,
                            "ROPE": rope,
                            "EARLY_V": K.early_v(chunk, dim),
                            "MERGE": merge,
                            "MERGE_BLOCK": 16,
                            "PDL": pdl,
                        },
                        num_warps=warps,
                        launch_pdl=pdl,
                    )
                    assert ("atom.global.gpu.acq_rel.add" in ptx) == merge and ("bar.sync" in ptx or not merge)
                    assert ("griddepcontrol.wait" in ptx) == pdl and ("griddepcontrol.launch_dependents" in ptx) == pdl
    ptx = compiled(attention_module._attention_merge_kernel, pointers, {"D": 128, "MERGE_BLOCK": 8}, num_warps=4)
    assert "griddepcontrol" not in ptx
