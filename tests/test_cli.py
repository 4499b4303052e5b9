"""The command line end to end, the way a user drives it, and its error exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import MICRO_FLAGS

from onebox.cli import main


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_prepare_train_export_generate(tmp_path, capsys):
    plays = tmp_path / "plays"
    plays.mkdir()
    from onebox.tokenizer import iter_shakespeare, shakespeare_play_files

    for i, text in enumerate(iter_shakespeare(shakespeare_play_files()[:4])):
        (plays / f"{i}.txt").write_text(text)
    assert (
        main(["prepare", str(plays), "--out", str(tmp_path / "data"), "--vocab-size", "512", "--val-fraction", "0.25"])
        == 0
    )
    run = tmp_path / "run"
    code = main(
        [
            "train",
            *MICRO_FLAGS,
            "--data",
            str(tmp_path / "data"),
            "--out-dir",
            str(run),
            "--max-steps",
            "8",
            "--batch-size",
            "4",
            "--eval-every",
            "4",
            "--eval-batches",
            "2",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "val bits/byte" in out and (run / "ckpt_0000008.pt").is_file()
    assert json.loads((run / "config.json").read_text())["model"]["dim"] == 64
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert "as a Hugging Face llama folder" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "KING:", "--max-new-tokens", "10", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("KING:")
    assert main(["generate", str(run), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--temperature", "0"]) == 0


def test_toml_config_and_flag_precedence(tmp_path, corpus_dir):
    from onebox.presets import resolve_configs

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
        (["generate", "/nonexistent.pt", "--temperature", "-1"], "temperature must be between 0"),
        (["generate", "/nonexistent.pt", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["generate", "/nonexistent.pt", "--top-k", "-3"], "top_k must be 0"),
        (["generate", "/nonexistent.pt", "--max-new-tokens", "0"], "max_tokens must be at least 1"),
        (["train", "--memory", "lots"], "invalid choice"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals (a choice that is not one)
        code = exit_.code
    assert code in (1, 2)
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_a_typo_inside_a_subcommand_gets_that_subcommands_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--bach-size", "4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: onebox train") and "did you mean --batch-size?" in err
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--batchs", "1"])
    assert capsys.readouterr().err.startswith("usage: onebox bench decode")


def test_help_says_where_defaults_come_from_and_names_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "model fields (default: the preset's)" in text and "default 768" not in text
    assert "{auto,standard,checkpointed,bf16,bf16-checkpointed,offload,offload-int8}" in text and "{adamw,muon}" in text
    for argv in (["serve", "--help"], ["bench", "forward", "--help"], ["bench", "dims", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert "(default auto)" in text
        if argv[0] == "serve":
            assert "TCP port (default 8000)" in text and "127.0.0.1: this machine only" in text
        else:
            assert "fp8" not in text


def test_report_with_nothing_to_report_creates_no_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 1
    assert main(["results", "list"]) == 1
    assert "no result documents" in capsys.readouterr().err and not (tmp_path / "results").exists()


def test_counts_are_singular_where_one(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(f"line {i} of the only play" for i in range(3000)))
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "data"), "--vocab-size", "300"]) == 0
    assert "(1 document, 0 held out" in capsys.readouterr().out


def test_bad_toml_is_reported(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("preset = \n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 1
    assert "not valid TOML" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_resume_continues(tmp_path, corpus_dir):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "onebox.cli",
        "train",
        *MICRO_FLAGS,
        "--data",
        str(corpus_dir),
        "--out-dir",
        str(run),
        "--max-steps",
        "100000",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "--ckpt-every",
        "0",
        "--log-every",
        "5",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved to" in err and "Traceback" not in err
    saved = sorted(run.glob("ckpt_*.pt"))
    assert len(saved) == 1
    step = int(saved[0].stem.split("_")[1])
    assert step >= 10
    resumed = subprocess.run(
        [sys.executable, "-m", "onebox.cli", "train", "--resume", str(run), "--max-steps", str(step + 3), "--quiet"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {step} from {saved[0]}" in resumed.stdout and (run / f"ckpt_{step + 3:07d}.pt").is_file()
