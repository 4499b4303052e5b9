"""`onebox eval`: the loss is the mean token cross-entropy over the held-out windows, computed directly here."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from conftest import micro_model, micro_train

from onebox.cli import main
from onebox.data import dataset_info, read_shard
from onebox.infer.generate import load_model
from onebox.training import train


def test_eval_equals_a_direct_computation_over_the_held_out_windows(tmp_path, corpus_dir, capsys):
    run = tmp_path / "run"
    train(micro_model(), micro_train(run, corpus_dir, max_steps=6, eval_every=0), show_progress=False)
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(run),
                "--data",
                str(corpus_dir),
                "--batch",
                "4",
                "--context",
                "32",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert "perplexity" in capsys.readouterr().out
    model, _ = load_model(run, "cpu")
    windows = []
    for shard in dataset_info(corpus_dir).val_shards:
        tokens = np.asarray(read_shard(shard), dtype=np.int64)
        windows += [tokens[i * 32 : i * 32 + 33] for i in range((len(tokens) - 1) // 32)]
    windows = torch.tensor(np.stack(windows[: result["windows"]]))
    with torch.no_grad():
        logits = model(windows[:, :-1])
        direct = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result["windows"] == len(windows) and result["tokens"] == 32 * len(windows)
    assert abs(result["loss"] - direct.item()) < 1e-4 and abs(result["perplexity"] - math.exp(direct.item())) < 1e-2
    per_token = dataset_info(corpus_dir).val_bytes_per_token
    assert abs(result["bits_per_byte"] - direct.item() / math.log(2) / per_token) < 1e-4


def test_eval_refuses_data_without_a_held_out_split(tmp_path, corpus_dir, capsys):
    import shutil

    data = tmp_path / "train-only"
    data.mkdir()
    for shard in dataset_info(corpus_dir).train_shards:
        shutil.copy(shard, data / shard.name)
    assert main(["eval", str(tmp_path), "--data", str(data), "--device", "cpu"]) == 1
    assert "no validation shards" in capsys.readouterr().err
