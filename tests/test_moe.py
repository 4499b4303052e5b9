"""The three computations of a sparse MoE block agree: grouped GEMM (training, prefill), one product per
expert (the reference) and gathered weights (decode), in outputs and in gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from onebox.moe import MoE, grouped_mm_runs
from onebox.presets import preset


def _block(experts=8, top_k=2, seed=0):
    torch.manual_seed(seed)
    config = dataclasses.replace(
        preset("qwen3-moe-tiny"), dim=64, experts=experts, experts_per_token=top_k, expert_hidden=32
    )
    block = MoE(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block


def _run(block, x, path):
    x = x.clone().requires_grad_(True)
    block.zero_grad()
    flat = x.reshape(-1, x.shape[-1])
    chosen, weights = block.route(flat)
    out = getattr(block, path)(flat, chosen, weights)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    grads = [x.grad] + [p.grad.clone() for p in (block.router.weight, block.gate_up, block.down)]
    return out.detach(), grads


@pytest.mark.skipif(not grouped_mm_runs(torch.device("cpu"), torch.float32), reason="this torch has no grouped GEMM")
@pytest.mark.parametrize("experts, top_k", [(8, 2), (16, 4)])
def test_grouped_gemm_equals_one_product_per_expert_forward_and_backward(experts, top_k):
    """fp32: max abs difference <= 1e-5 (the same products, summed in another order)."""
    block = _block(experts, top_k)
    x = torch.randn(3, 11, 64)  # 33 tokens: some experts get none
    out, grads = _run(block, x, "grouped")
    ref_out, ref_grads = _run(block, x, "looped")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gathered_weights_equal_one_product_per_expert():
    block = _block()
    x = torch.randn(1, 3, 64)
    out, grads = _run(block, x, "gathered")
    ref_out, ref_grads = _run(block, x, "looped")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not grouped_mm_runs(torch.device("cpu"), torch.bfloat16), reason="this torch has no grouped GEMM")
def test_grouped_gemm_runs_in_autocasts_dtype():
    """Under bf16 autocast the grouped products run in bf16 like the looped path's F.linear (rel. error <= 2e-2)."""
    block = _block()
    x = torch.randn(40, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chosen, weights = block.route(x)
        out = block.grouped(x, chosen, weights)
        ref = block.looped(x, chosen, weights)
    assert out.dtype == ref.dtype
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 2e-2


@pytest.mark.skipif(not grouped_mm_runs(torch.device("cpu"), torch.float32), reason="this torch has no grouped GEMM")
def test_a_decode_step_through_the_grouped_gemm_equals_the_gathered_one():
    block = _block().eval()
    x = torch.randn(3, 1, 64)  # three rows, one token each: 6 pairs for 8 experts
    with torch.no_grad():
        gathered = block(x)
        block.few = "grouped"
        grouped = block(x)
    torch.testing.assert_close(grouped, gathered, atol=1e-5, rtol=1e-5)
