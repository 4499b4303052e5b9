"""The command line end to end, the way a user drives it, and its error exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from onebox.cli import main

MICRO = ["--dim", "64", "--hidden", "160", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--seq-len", "64", "--vocab-size", "512"]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_prepare_train_export_generate(tmp_path, capsys):
    plays = tmp_path / "plays"
    plays.mkdir()
    from onebox.tokenizer import iter_shakespeare, shakespeare_play_files

    for i, text in enumerate(iter_shakespeare(shakespeare_play_files()[:4])):
        (plays / f"{i}.txt").write_text(text)
    assert main(["prepare", str(plays), "--out", str(tmp_path / "data"), "--vocab-size", "512", "--val-fraction", "0.25"]) == 0
    run = tmp_path / "run"
    code = main(["train", *MICRO, "--data", str(tmp_path / "data"), "--out-dir", str(run), "--max-steps", "8",
                 "--batch-size", "4", "--eval-every", "4", "--eval-batches", "2", "--device", "cpu", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "val bits/byte" in out and (run / "ckpt_0000008.pt").is_file()
    assert json.loads((run / "config.json").read_text())["model"]["dim"] == 64
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert "as a Hugging Face Llama folder" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "KING:", "--max-new-tokens", "10", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("KING:")
    assert main(["generate", str(run), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--temperature", "0"]) == 0


def test_toml_config_and_flag_precedence(tmp_path, corpus_dir):
    from onebox.config import resolve_configs

    (tmp_path / "job.toml").write_text('preset = "48m"\n[model]\nlayers = 2\n[train]\nlr = 0.01\nbatch_size = 3\n')
    model, train = resolve_configs(None, str(tmp_path / "job.toml"), {"layers": "3"}, {"batch_size": "5"})
    assert (model.name, model.dim, model.layers, train.lr, train.batch_size) == ("48m", 768, 3, 0.01, 5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--dim", "100", "--heads", "3"], "not divisible by heads"),
        (["train", "--batch-size", "lots"], "batch_size expects a int value"),
        (["train", "--config", "/nonexistent.toml"], "does not exist"),
        (["train", "--data", "/nonexistent-data", "--device", "cpu"], "does not exist"),
        (["train", "--resume", "/nonexistent-run"], "does not exist"),
        (["export", "/nonexistent.pt", "/tmp/x"], "does not exist"),
        (["generate", "/nonexistent.pt"], "does not exist"),
        (["prepare", "/nonexistent.txt", "--out", "/tmp/x"], "does not exist"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_bad_toml_is_reported(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("preset = \n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 1
    assert "not valid TOML" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_resume_continues(tmp_path, corpus_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "onebox.cli", "train", *MICRO, "--data", str(corpus_dir), "--out-dir", str(run),
           "--max-steps", "100000", "--batch-size", "4", "--eval-every", "0", "--ckpt-every", "0", "--log-every", "5", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved to" in err and "Traceback" not in err
    saved = sorted(run.glob("ckpt_*.pt"))
    assert len(saved) == 1
    step = int(saved[0].stem.split("_")[1])
    assert step >= 10
    resumed = subprocess.run([sys.executable, "-m", "onebox.cli", "train", "--resume", str(run), "--max-steps", str(step + 3), "--quiet"],
                             capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {saved[0]}" in resumed.stdout and (run / f"ckpt_{step + 3:07d}.pt").is_file()
