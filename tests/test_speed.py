"""The fast training paths against the reference: compiled scopes, the compiled training loop, FP8 (emulated on CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import micro_model, micro_train

from onebox.config import TrainConfig
from onebox.errors import OneboxError
from onebox.model import Transformer
from onebox.optim import build_optimizer
from onebox.training import train
from onebox.transforms import apply_float8, training_loss


def _loss_and_grads(model: Transformer, scope: str | None, x: torch.Tensor, y: torch.Tensor, autocast: bool = False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = training_loss(model, scope)(x, y)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def batch():
    config = micro_model()
    generator = torch.Generator().manual_seed(7)  # fresh random tokens, never zeros
    x = torch.randint(0, config.vocab_size, (3, config.seq_len), generator=generator)
    y = torch.randint(0, config.vocab_size, (3, config.seq_len), generator=generator)
    return config, x, y


@pytest.mark.parametrize("scope", ["block", "model"])
def test_compiled_scopes_match_eager(batch, scope):
    config, x, y = batch
    torch.manual_seed(0)
    reference = Transformer(config)
    compiled = Transformer(config)
    compiled.load_state_dict(reference.state_dict())
    torch._dynamo.reset()
    ref_loss, ref_grads = _loss_and_grads(reference, None, x, y)
    loss, grads = _loss_and_grads(compiled, scope, x, y)
    assert math.isclose(loss, ref_loss, rel_tol=1e-5)  # fp32: only the order of reductions differs
    assert all(_rel(grads[name], ref_grads[name]) < 1e-4 for name in ref_grads)


def _losses(run) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {entry["step"]: entry["loss"] for entry in lines if "loss" in entry}


def test_compiled_training_tracks_the_eager_reference(tmp_path, corpus_dir):
    common = dict(max_steps=8, eval_every=0, ckpt_every=0)
    torch._dynamo.reset()
    train(micro_model(), micro_train(tmp_path / "eager", corpus_dir, **common), show_progress=False)
    train(micro_model(), micro_train(tmp_path / "fast", corpus_dir, compile="block", **common), show_progress=False)
    eager, fast = _losses(tmp_path / "eager"), _losses(tmp_path / "fast")
    assert eager[8] < eager[1] - 0.2  # it learned, so the comparison means something
    assert all(math.isclose(eager[s], fast[s], rel_tol=1e-4) for s in eager)  # fp32 over 8 steps


def test_fp8_converts_only_the_block_products_and_keeps_names(batch):
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    config, _, _ = batch
    model = Transformer(micro_model(tie_embeddings=False))
    keys = list(model.state_dict())
    apply_float8(model, torch.device("cpu"), emulate=True)
    assert list(model.state_dict()) == keys
    converted = {name for name, module in model.named_modules() if isinstance(module, Float8Linear)}
    assert converted == {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("layers.")
    }
    assert len(converted) == 7 * config.layers and "lm_head" not in converted


def test_fp8_emulated_tracks_bf16(batch):
    pytest.importorskip("torchao")
    config, x, y = batch
    torch.manual_seed(0)
    reference = Transformer(config)
    fp8 = Transformer(config)
    fp8.load_state_dict(reference.state_dict())
    apply_float8(fp8, torch.device("cpu"), emulate=True)
    ref_loss, ref_grads = _loss_and_grads(reference, None, x, y, autocast=True)
    loss, grads = _loss_and_grads(fp8, None, x, y, autocast=True)
    # e4m3 operands (3 mantissa bits) forward, e5m2 gradients (2 bits) backward: the loss moves by
    # well under 1%, each weight gradient by about 10% of its norm; a wrong scale would be off by far more.
    assert math.isclose(loss, ref_loss, rel_tol=1e-2)
    errors = {name: _rel(grads[name], ref_grads[name]) for name in ref_grads}
    assert max(errors.values()) < 0.3, errors
    assert min(errors[name] for name in errors if name.endswith("proj.weight")) > 1e-3  # the FP8 casts did happen
    assert errors["embed_tokens.weight"] < 0.3


def test_fp8_is_refused_where_there_are_no_fp8_units():
    with pytest.raises(OneboxError, match=r"compute capability 8\.9.*--precision bf16"):
        apply_float8(Transformer(micro_model()), torch.device("cpu"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clipping active, and a bound the gradients never reach
def test_clip_folded_into_the_optimizer_step_equals_clip_then_step(batch, optimizer, max_norm, device):
    if optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    config, x, y = batch
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    with torch.device(device):
        models = [Transformer(config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    initial = models[0].layers[0].mlp.up_proj.weight.detach().clone()
    optimizers = [build_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-2, device=device)) for model in models]
    assert all(
        getattr(opt, "takes_grad_scale", False) or opt.defaults["fused"]
        for opt in optimizers[1].optimizers
        if isinstance(opt, torch.optim.AdamW)
    )  # the grad_scale path runs
    # One step for Muon: its Newton-Schulz iteration runs in bf16 and turns the last-bit differences
    # of multiplying vs dividing by the clip factor into ~1e-4 after a second step; AdamW stays at 1e-7.
    for _ in range(3 if optimizer == "adamw" else 1):
        for model in models:
            training_loss(model, None)(x, y).backward()
        torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
        optimizers[0].step()
        optimizers[1].step(max_grad_norm=max_norm)
        for opt in optimizers:
            opt.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name  # fp32: multiply vs divide by the same factor
    assert not torch.equal(models[0].layers[0].mlp.up_proj.weight, initial)  # the steps did move the weights
