"""Run folders: resuming never mixes trajectories or writes where the user did not point, and every way a
run can go wrong (disk full, a finished run, foreign data) ends in a message instead of lost work."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import micro_model, micro_train

from onebox.checkpoint import list_checkpoints, load_checkpoint
from onebox.cli import main
from onebox.data import write_shard
from onebox.errors import OneboxError
from onebox.training import resume_configs, train


def _steps(folder):
    return [int(p.stem.split("_")[1]) for p in list_checkpoints(folder)]


def _metric_steps(folder):
    return [
        json.loads(line)["step"]
        for line in (folder / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


def _resume(target, said=None, **overrides):
    model, config, path = resume_configs(str(target), overrides)
    from rich.console import Console

    console = Console(file=open(os.devnull, "w")) if said is None else None
    if said is not None:

        class Recorder:
            def print(self, message, **_):
                said.append(message)

        console = Recorder()
    return train(model, config, resume=str(path), console=console, show_progress=False)


@pytest.fixture
def finished_run(tmp_path, corpus_dir):
    run = tmp_path / "run"
    train(
        micro_model(),
        micro_train(run, corpus_dir, max_steps=6, ckpt_every=2, keep_last=3, eval_every=0),
        show_progress=False,
    )
    assert _steps(run) == [2, 4, 6]
    return run


def test_resuming_an_older_checkpoint_beside_later_ones_is_refused_and_deletes_nothing(finished_run, tmp_path):
    with pytest.raises(OneboxError, match="later checkpoints.*steps 4, 6.*--out-dir"):
        _resume(finished_run / "ckpt_0000002.pt", max_steps=8, keep_last=2)
    assert _steps(finished_run) == [2, 4, 6]


def test_a_fork_from_an_older_step_writes_only_to_its_own_folder(finished_run, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()}
    fork = tmp_path / "fork"
    _resume(finished_run / "ckpt_0000002.pt", out_dir=str(fork), max_steps=8, ckpt_every=2, keep_last=2)
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()} == before  # the original run is untouched
    assert _steps(fork) == [6, 8] and _metric_steps(fork) == [3, 4, 5, 6, 7, 8]
    assert json.loads((fork / "config.json").read_text())["train"]["out_dir"] == str(fork)


def test_resume_from_a_copied_run_writes_into_the_copy(finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    before = {p.name: p.read_bytes() for p in finished_run.iterdir()}
    _resume(copy / "ckpt_0000006.pt", max_steps=8, ckpt_every=2, keep_last=2)
    assert {p.name: p.read_bytes() for p in finished_run.iterdir()} == before
    assert _steps(copy) == [6, 8] and json.loads((copy / "config.json").read_text())["train"]["out_dir"] == str(copy)


def test_a_foreign_checkpoint_in_a_run_folder_is_refused(finished_run, tmp_path, corpus_dir):
    other = tmp_path / "other"
    train(micro_model(layers=1), micro_train(other, corpus_dir, max_steps=8, eval_every=0), show_progress=False)
    shutil.copy(other / "ckpt_0000008.pt", finished_run)
    with pytest.raises(
        OneboxError, match=r"holds a micro model \(64d/160h/1L.*describes a micro model.*comes from another run"
    ):
        _resume(finished_run, max_steps=12)


def test_resume_says_what_it_resumes_and_what_the_schedule_does(finished_run):
    said = []
    _resume(finished_run, said, max_steps=9)
    text = "\n".join(said)
    assert "resuming micro (64d/160h/2L/seq64" in text and "at step 6 from" in text
    assert "schedule is recomputed (max_steps 6 -> 9)" in text and "the lr goes from" in text


def test_resuming_a_finished_run_says_it_is_complete(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "is complete" in out and "--max-steps 12" in out and "done: step 6" in out


def test_a_full_disk_gives_a_message_and_keeps_the_last_good_checkpoint(finished_run, monkeypatch):
    import onebox.checkpoint as checkpoint_module

    real_save = torch.save

    def full(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file write failed"
        ) from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(
        OneboxError,
        match=r"disk holding .* is full.*checkpoint of step 7.*GB.*last good checkpoint is .*ckpt_0000006.pt",
    ):
        _resume(finished_run, max_steps=7)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert _steps(finished_run) == [2, 4, 6] and not list(finished_run.glob(".*.tmp"))
    assert load_checkpoint(finished_run)["step"] == 6


def test_stale_temp_files_of_killed_saves_are_removed_at_start(finished_run):
    (finished_run / ".ckpt_0000008.pt.tmp").write_bytes(b"x" * 1000)
    (finished_run / ".ckpt_0000008.dcp.tmp").mkdir()
    said = []
    _resume(finished_run, said, max_steps=7)
    assert not list(finished_run.glob(".ckpt_*")) and any("interrupted checkpoint save" in line for line in said)


def test_the_data_folder_is_stored_resolved_and_resume_works_from_elsewhere(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.chdir(corpus_dir.parent)
    run = tmp_path / "run"
    train(micro_model(), micro_train(run, corpus_dir.name, max_steps=2, eval_every=0), show_progress=False)
    assert load_checkpoint(run)["train_config"]["data"] == str(corpus_dir.resolve())
    monkeypatch.chdir(tmp_path)
    _resume(run, max_steps=3)
    assert _steps(run)[-1] == 3


def test_a_preset_that_disagrees_with_the_resumed_run_is_refused(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), "--preset", "48m", "--max-steps", "8"]) == 1
    assert "--preset 48m gives 48m" in capsys.readouterr().err


def test_small_validation_data_is_evaluated_as_a_partial_batch(tmp_path, corpus_dir):
    data = tmp_path / "small"
    data.mkdir()
    shutil.copy(corpus_dir / "tokenizer.json", data)
    shutil.copy(next(corpus_dir.glob("train_*.bin")), data / "train_000000.bin")
    write_shard(data / "val_000000.bin", np.arange(3 * 65 + 1, dtype=np.uint16) % 500)
    result = train(
        micro_model(), micro_train(tmp_path / "run", data, max_steps=2, batch_size=4, eval_every=0), show_progress=False
    )
    assert result.val_loss is not None and np.isfinite(result.val_loss)


def test_init_from_a_run_folder_and_a_checkpoint(finished_run, tmp_path, corpus_dir):
    state = load_checkpoint(finished_run)["model"]
    for source in (finished_run, finished_run / "ckpt_0000004.pt"):
        out = tmp_path / f"from-{source.name}"
        train(
            micro_model(),
            micro_train(out, corpus_dir, init_from=str(source), max_steps=1, eval_every=0, lr=1e-9, warmup_steps=0),
            show_progress=False,
        )
        reference = load_checkpoint(source)["model"]
        got = load_checkpoint(out)["model"]
        assert load_checkpoint(out)["step"] == 1
        assert all(torch.allclose(got[k], reference[k], atol=1e-6) for k in reference)
    assert state.keys() == got.keys()


def test_init_from_refuses_data_of_another_tokenizer(finished_run, tmp_path):
    from onebox.data import prepare

    text = tmp_path / "code"
    text.mkdir()
    for i in range(6):
        (text / f"{i}.txt").write_text("def f(x):\n    return x + 1\n" * (200 + i))
    prepare([text], tmp_path / "code-data", vocab_size=400, val_fraction=0.2)
    with pytest.raises(OneboxError, match="tokenized with another tokenizer.*--tokenizer"):
        train(
            micro_model(),
            micro_train(tmp_path / "ft", tmp_path / "code-data", init_from=str(finished_run), max_steps=1),
            show_progress=False,
        )


def test_a_plan_that_does_not_fit_the_hosts_ram_is_refused_on_the_cpu(tmp_path, corpus_dir, monkeypatch):
    import onebox.plan as plan_module

    monkeypatch.setattr(
        plan_module.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 1000
    )  # a 4 MB machine
    with pytest.raises(OneboxError, match="predicted to need .* GB of RAM.*onebox plan"):
        train(
            micro_model(),
            micro_train(tmp_path / "run", corpus_dir, max_steps=1, memory="standard"),
            show_progress=False,
        )
    assert not list_checkpoints(tmp_path / "run")


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, corpus_dir):
    said = []

    class Recorder:
        def print(self, message, **_):
            said.append(message)

    train(
        micro_model(),
        micro_train(tmp_path / "run", corpus_dir, max_steps=3, warmup_steps=3, eval_every=0),
        console=Recorder(),
        show_progress=False,
    )
    assert any("warmup_steps 3 >= max_steps 3" in line and "never decays" in line for line in said)


def test_a_tokenizer_is_the_same_whichever_way_its_merges_are_written(corpus_dir):
    from onebox.tokenizer import tokenizer_identity

    text = (corpus_dir / "tokenizer.json").read_text()
    doc = json.loads(text)
    merges = doc["model"]["merges"]
    doc["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    as_strings = json.dumps(doc)
    doc["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in doc["model"]["merges"]]
    assert tokenizer_identity(as_strings) == tokenizer_identity(json.dumps(doc, indent=4)) == tokenizer_identity(text)
    doc["model"]["merges"] = doc["model"]["merges"][:-1]
    assert tokenizer_identity(json.dumps(doc)) != tokenizer_identity(text)
