"""The training loop: loss falls, exact resume, atomic checkpoints, and every failure's message."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import micro_model, micro_train

import onebox.transforms as transforms_module
from onebox.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from onebox.config import apply_overrides
from onebox.errors import OneboxError
from onebox.optim import lr_factor
from onebox.training import NonFiniteLoss, resume_configs, train


def _losses(run_dir):
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def _val_losses(run_dir):
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["val_loss"] for e in entries if "val_loss" in e]


def test_loss_falls_on_the_default_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEBOX_CACHE", str(tmp_path / "cache"))
    config = micro_train(
        tmp_path / "run", "", max_steps=40, batch_size=8, eval_every=20, eval_batches=4, ckpt_every=0, log_every=10
    )
    result = train(micro_model(vocab_size=8192), config, show_progress=False)
    losses = _losses(tmp_path / "run")
    assert losses[40] < losses[10] - 0.5
    assert result.val_bpb is not None and result.val_bpb < 3.5
    assert (tmp_path / "cache" / "shakespeare-bpe8192" / "meta.json").is_file()


def test_resume_continues_exactly(tmp_path, corpus_dir):
    config = micro_train(tmp_path / "a", corpus_dir)
    train(micro_model(), config, show_progress=False)
    full = _losses(tmp_path / "a")
    middle = tmp_path / "a" / "ckpt_0000006.pt"
    model_cfg, train_cfg, path = resume_configs(str(middle), {"out_dir": str(tmp_path / "b")})
    train(model_cfg, train_cfg, resume=str(path), show_progress=False)
    resumed = _losses(tmp_path / "b")
    assert sorted(resumed) == list(range(7, 13))
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)


def test_checkpoint_holds_what_resume_needs(tmp_path, corpus_dir):
    train(micro_model(), micro_train(tmp_path / "r", corpus_dir), show_progress=False)
    payload = load_checkpoint(tmp_path / "r")
    assert payload["step"] == 12
    assert {"model", "optimizer", "data", "rng", "model_config", "train_config", "tokenizer_json"} <= set(payload)
    assert payload["data"]["cursor"] > 0 and payload["optimizer"][0]["state"]
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["ckpt_0000006.pt", "ckpt_0000012.pt"]


def test_keep_last_prunes_old_checkpoints(tmp_path, corpus_dir):
    train(micro_model(), micro_train(tmp_path / "r", corpus_dir, ckpt_every=2, keep_last=2), show_progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["ckpt_0000010.pt", "ckpt_0000012.pt"]


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path / "ckpt_0000001.pt", {"step": 1, "model": {"w": torch.ones(3)}})

    def dying_save(obj, handle):
        handle.write(b"PK\x03\x04 partial bytes of a checkpoint")
        raise KeyboardInterrupt  # the process is stopped in the middle of writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt_0000002.pt", {"step": 2, "model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(tmp_path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000001.pt"]


def test_a_killed_save_leaves_only_an_ignored_temp_file(tmp_path):
    save_checkpoint(tmp_path / "ckpt_0000001.pt", {"step": 1})
    (tmp_path / ".ckpt_0000002.pt.tmp").write_bytes(b"half a checkpoint")  # what SIGKILL mid-save leaves
    assert load_checkpoint(tmp_path)["step"] == 1


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt_0000001.pt", {"step": 1, "model": {"w": torch.randn(1000)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OneboxError, match="corrupt or truncated"):
        load_checkpoint(path)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(OneboxError, match="not a onebox checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(OneboxError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(OneboxError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "empty_run")


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(tmp_path, corpus_dir, monkeypatch):
    calls = {"n": 0}
    real = transforms_module.cross_entropy_loss

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] > 8 else loss

    monkeypatch.setattr(transforms_module, "cross_entropy_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"last good checkpoint is .*ckpt_0000006\.pt"):
        train(micro_model(), micro_train(tmp_path / "r", corpus_dir, eval_every=0), show_progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["ckpt_0000006.pt"]


def test_out_of_memory_names_the_estimate_and_the_remedies(tmp_path, corpus_dir, monkeypatch):
    def oom(logits, targets):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transforms_module, "cross_entropy_loss", oom)
    with pytest.raises(OneboxError, match=r"Estimated need: [\d.]+ GB .*--batch-size.*--activation-checkpointing"):
        train(micro_model(), micro_train(tmp_path / "r", corpus_dir), show_progress=False)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, corpus_dir):
    with pytest.raises(
        OneboxError, match="tokenizer has 512 entries but the model's vocabulary has 256.*--vocab-size 512"
    ):
        train(micro_model(vocab_size=256), micro_train(tmp_path / "r", corpus_dir), show_progress=False)


def test_gradient_accumulation_matches_the_large_batch(tmp_path, corpus_dir):
    common = dict(max_steps=3, eval_every=0, ckpt_every=0)
    train(micro_model(), micro_train(tmp_path / "big", corpus_dir, batch_size=8, **common), show_progress=False)
    train(
        micro_model(),
        micro_train(tmp_path / "acc", corpus_dir, batch_size=4, grad_accum=2, **common),
        show_progress=False,
    )
    big, acc = _losses(tmp_path / "big"), _losses(tmp_path / "acc")
    assert all(math.isclose(big[s], acc[s], rel_tol=1e-5) for s in big)  # fp32: same windows, summed in another order


def test_activation_checkpointing_gives_the_same_losses(tmp_path, corpus_dir):
    common = dict(max_steps=4, eval_every=0, ckpt_every=0)
    train(micro_model(), micro_train(tmp_path / "plain", corpus_dir, **common), show_progress=False)
    train(
        micro_model(),
        micro_train(tmp_path / "ac", corpus_dir, activation_checkpointing=True, **common),
        show_progress=False,
    )
    plain, ac = _losses(tmp_path / "plain"), _losses(tmp_path / "ac")
    assert all(math.isclose(plain[s], ac[s], rel_tol=1e-6) for s in plain)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_trains(tmp_path, corpus_dir):
    train(
        micro_model(),
        micro_train(tmp_path / "m", corpus_dir, optimizer="muon", max_steps=20, eval_every=0),
        show_progress=False,
    )
    losses = _losses(tmp_path / "m")
    assert losses[20] < losses[1] - 0.3


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    config = apply_overrides(micro_train("x", "x"), {"max_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1})
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, config) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(batch_size=0), "batch_size must be positive"),
        (dict(lr=-1.0), "learning rates"),
        (dict(optimizer="sgd"), "optimizer must be adamw or muon"),
        (dict(precision="fp16"), "precision must be"),
        (dict(min_lr_ratio=2.0), "min_lr_ratio"),
    ],
)
def test_invalid_train_values_are_refused(tmp_path, changes, message):
    with pytest.raises(OneboxError, match=message):
        micro_train(tmp_path, tmp_path, **changes)


def test_field_override_type_errors_are_clear():
    with pytest.raises(OneboxError, match="batch_size expects a int value, got 'many'"):
        apply_overrides(micro_train("x", "x"), {"batch_size": "many"})
    with pytest.raises(OneboxError, match="unknown TrainConfig field 'bogus'"):
        apply_overrides(micro_train("x", "x"), {"bogus": 1})


def test_a_fresh_run_refuses_to_overwrite_an_existing_one(tmp_path, corpus_dir):
    config = micro_train(tmp_path / "r", corpus_dir, max_steps=2, eval_every=0)
    train(micro_model(), config, show_progress=False)
    with pytest.raises(OneboxError, match="already holds the checkpoints of a run.*--resume"):
        train(micro_model(), config, show_progress=False)


def test_training_collects_garbage_on_its_own_schedule():
    import gc

    from onebox.host import GC_EVERY, collect_young, steady_collection

    assert gc.isenabled()
    with steady_collection():
        assert not gc.isenabled()  # no collector pauses of its own choosing inside the loop
        for _ in range(1000):
            cycle = []
            cycle.append(cycle)
        del cycle
        pending = gc.get_count()[0]
        assert pending > 0
        collect_young(GC_EVERY + 1)  # not a scheduled step: nothing collected
        assert gc.get_count()[0] >= pending
        collect_young(2 * GC_EVERY)
        assert gc.get_count()[0] < pending
    assert gc.isenabled()
