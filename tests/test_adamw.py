"""onebox's Triton AdamW (adamw.py) against torch.optim.AdamW on random inputs: on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, in a fresh process: the variable is read when the kernel is defined), and on
CUDA (marked gpu) against torch's fused AdamW. fp32 throughout: the same operations in the same precision,
differing only in the order of a few roundings, so weights agree within 1e-6 relative (+1e-7 absolute for
values near zero) and moments within 1e-6 relative (+1e-6 of their largest value: torch's unfused AdamW
forms the first moment by lerp, which rounds differently where it nearly cancels) after three steps, one
with a grad_scale and a learning rate that changes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from onebox.adamw import TritonAdamW, make_adamw

SCRIPT = textwrap.dedent("""
    import torch
    from onebox.adamw import TritonAdamW

    torch.manual_seed(0)
    shapes = [(300, 77), (2049,), (4, 4096)]  # a ragged last block, a vector, several blocks

    def groups(params):
        return [{"params": params[:2], "weight_decay": 0.1, "lr": 1e-2}, {"params": params[2:], "weight_decay": 0.0, "lr": 3e-3}]

    def fresh(values):
        return [v.clone().requires_grad_() for v in values]

    start = [torch.randn(s) for s in shapes]
    ref, ours = fresh(start), fresh(start)
    a = torch.optim.AdamW(groups(ref), betas=(0.9, 0.95), eps=1e-8, foreach=False)
    b = TritonAdamW(groups(ours), betas=(0.9, 0.95), eps=1e-8, fused=True)  # fused/foreach are torch's switches: ignored

    def step(grads, scale):
        for p, q, g in zip(ref, ours, grads):
            p.grad, q.grad = (g / scale if scale is not None else g.clone()), g.clone()
        b.grad_scale = scale
        a.step()
        b.step()
        for group in a.param_groups + b.param_groups:
            group["lr"] *= 0.5  # as a schedule would

    def same(what):
        for p, q in zip(ref, ours):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what} weights: {m}")
            for key in ("exp_avg", "exp_avg_sq"):
                ref_moment = a.state[p][key]  # torch's unfused AdamW forms exp_avg by lerp, its fused one and ours by b1 m + (1 - b1) g
                torch.testing.assert_close(b.state[q][key], ref_moment, rtol=1e-6, atol=1e-6 * ref_moment.abs().max().item(),
                                           msg=lambda m: f"{what} {key}: {m}")
            assert float(b.state[q]["step"]) == float(a.state[p]["step"])

    for i, scale in enumerate([None, torch.tensor(2.5), None]):
        step([torch.randn(s) * (10.0 if i == 0 else 1.0) for s in shapes], scale)
    same("3 steps")
    moved = max((q - s).abs().max().item() for q, s in zip(ours, start))
    assert moved > 1e-3, moved  # the weights did move

    # the state dict is torch's: torch's AdamW resumes from it, and ours from torch's
    resumed_ref, resumed_ours = fresh([p.detach() for p in ref]), fresh([q.detach() for q in ours])
    c = torch.optim.AdamW(groups(resumed_ref), betas=(0.9, 0.95), eps=1e-8, foreach=False)
    c.load_state_dict(b.state_dict())
    d = TritonAdamW(groups(resumed_ours), betas=(0.9, 0.95), eps=1e-8)
    d.load_state_dict(a.state_dict())
    ref, ours, a, b = resumed_ref, resumed_ours, c, d
    step([torch.randn(s) for s in shapes], None)
    same("resumed")
    print("adamw matches")
""")


def test_triton_adamw_matches_torch_adamw_in_the_interpreter():
    triton = pytest.importorskip(
        "triton", reason="Triton is not installed (it comes with the dev extras on Linux x86-64)"
    )
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails under numpy 2.3+ (3.7 or later needed)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "adamw matches" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]


def test_make_adamw_picks_torch_fused_adamw_off_cuda():
    params = [torch.nn.Parameter(torch.randn(3, 3))]
    opt = make_adamw([{"params": params}], lr=1e-3)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]


@pytest.mark.gpu
def test_triton_adamw_matches_torch_fused_adamw_on_cuda():
    torch.manual_seed(0)
    shapes = [(1536, 4096), (8191,), (20, 2048)]
    start = [torch.randn(s, device="cuda") for s in shapes]
    ref, ours = ([torch.nn.Parameter(v.clone()) for v in start] for _ in range(2))
    a = torch.optim.AdamW(ref, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    b = make_adamw([{"params": ours}], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    assert isinstance(b, TritonAdamW)
    for i in range(3):
        scale = torch.tensor(1.7, device="cuda") if i == 1 else None
        for p, q in zip(ref, ours):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        a.grad_scale = b.grad_scale = scale
        a.step()
        b.step()
    for p, q in zip(ref, ours):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            moment = a.state[p][key]
            torch.testing.assert_close(b.state[q][key], moment, rtol=1e-6, atol=1e-6 * moment.abs().max().item())
