"""LoRA: the adapted model equals the base at the start, only the adapters train, a merge equals the adapted
model, and a PEFT-format adapter loads in peft onto the transformers base with equal logits."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_model

from onebox.errors import OneboxError
from onebox.lora import LoRASpec, adapter_state, apply_lora, base_state, write_peft_adapter
from onebox.model import Transformer, cross_entropy_loss

SPEC = LoRASpec(rank=4, alpha=8.0)


def _adapted(spec=SPEC, seed=0):
    torch.manual_seed(seed)
    model = Transformer(micro_model())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = apply_lora(model, spec)
    return model, base, trainable


def _train(model, steps=5):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, 512, (2, 16))
        cross_entropy_loss(model(idx[:, :-1]), idx[:, 1:]).backward()
        opt.step()
        opt.zero_grad()


def test_at_the_start_the_adapted_model_is_the_base():
    model, base, _ = _adapted()
    plain = Transformer(micro_model())
    plain.load_state_dict(base)
    idx = torch.randint(0, 512, (2, 12))
    assert torch.equal(model(idx), plain(idx))


def test_only_the_adapters_train_and_a_merge_equals_the_adapted_model():
    model, base, trainable = _adapted()
    assert trainable and all(".lora_a" in n or ".lora_b" in n for n in trainable)
    assert len(trainable) == 2 * 7 * micro_model().layers  # A and B on all seven linear layers of each block
    _train(model)
    frozen = base_state(model)
    assert all(torch.equal(frozen[name], base[name]) for name in base)  # nothing but the adapters moved
    assert any(t.abs().sum() > 0 for n, t in adapter_state(model).items() if "lora_b" in n)
    merged = Transformer(micro_model())
    merged.load_state_dict(base_state(model, merged=True))
    idx = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(merged(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_targets_are_checked():
    with pytest.raises(OneboxError, match="choose among"):
        _adapted(LoRASpec(rank=2, targets="q,attention"))
    with pytest.raises(OneboxError, match="rank must be at least 1"):
        _adapted(LoRASpec(rank=0))


def test_a_peft_adapter_loads_onto_the_transformers_base_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from onebox.export import export_hf

    spec = LoRASpec(rank=4, alpha=8.0, targets="q,v,o,down")
    model, _, _ = _adapted(spec, seed=1)
    _train(model)
    model.eval()
    export_hf(base_state(model), model.config, None, tmp_path / "base")
    (tmp_path / "adapter").mkdir()
    write_peft_adapter(model, spec, tmp_path / "adapter", str(tmp_path / "base"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        diff = (theirs(input_ids=idx).logits - model(idx)).abs().max().item()
    assert diff <= 1e-4
