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


def _quiet_resume(target, **overrides):
    import os

    from rich.console import Console

    from onebox.training import resume_configs, train

    model, config, path = resume_configs(str(target), overrides)
    return train(model, config, resume=str(path), console=Console(file=open(os.devnull, "w")), show_progress=False)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, corpus_dir):
    """A small base run, a LoRA run on it (6 steps), and the same LoRA run stopped at 3 and resumed to 6."""
    from conftest import micro_train

    from onebox.training import train

    root = tmp_path_factory.mktemp("lora")
    train(micro_model(), micro_train(root / "base", corpus_dir, max_steps=8, eval_every=0), show_progress=False)
    lora = dict(init_from=str(root / "base"), lora_rank=4, lora_alpha=8.0, eval_every=0, keep_last=5)
    train(micro_model(), micro_train(root / "lora", corpus_dir, max_steps=6, ckpt_every=3, **lora), show_progress=False)
    train(micro_model(), micro_train(root / "half", corpus_dir, max_steps=3, ckpt_every=3, **lora), show_progress=False)
    _quiet_resume(root / "half", max_steps=6)
    return root


def test_a_lora_run_saves_only_its_adapters_and_resumes_exactly(lora_runs):
    from onebox.checkpoint import load_checkpoint

    full = load_checkpoint(lora_runs / "lora" / "ckpt_0000006.pt")
    resumed = load_checkpoint(lora_runs / "half" / "ckpt_0000006.pt")
    assert full["lora"] and set(full["model"]) and all(".lora_" in name for name in full["model"])
    assert set(full["model"]) == set(resumed["model"])
    assert all(torch.equal(full["model"][n], resumed["model"][n]) for n in full["model"])
    assert any(t.abs().sum() > 0 for n, t in full["model"].items() if "lora_b" in n)  # the adapters trained


def test_a_lora_run_exports_merged_and_as_a_peft_adapter(lora_runs, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from onebox.checkpoint import load_checkpoint
    from onebox.cli import main
    from onebox.training.start import lora_model

    checkpoint = lora_runs / "lora" / "ckpt_0000006.pt"
    adapted, _ = lora_model(load_checkpoint(checkpoint))
    adapted.eval()
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ours = adapted(idx)
    assert main(["export", str(checkpoint), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert main(["export", str(lora_runs / "base"), str(tmp_path / "base")]) == 0
    assert main(["export", str(checkpoint), str(tmp_path / "adapter"), "--adapter"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (merged(input_ids=idx).logits - ours).abs().max().item() <= 1e-4
        assert (with_adapter(input_ids=idx).logits - ours).abs().max().item() <= 1e-4


def test_lora_needs_a_model_to_adapt_and_refuses_what_it_cannot_do():
    from onebox.config import TrainConfig

    with pytest.raises(OneboxError, match="--init-from"):
        TrainConfig(lora_rank=4).validate()
    with pytest.raises(OneboxError, match="fp8"):
        TrainConfig(lora_rank=4, init_from="x", precision="fp8").validate()
