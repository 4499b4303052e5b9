"""Several processes through torchrun + FSDP2 with the gloo backend on the CPU: the same losses as one
process with the same global batch, a run saved on 2 processes resumed on 1, and the launcher."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import MICRO_FLAGS, micro_model

from onebox.checkpoint import load_checkpoint
from onebox.cli import main
from onebox.config import TrainConfig
from onebox.errors import OneboxError
from onebox.launch import failure_summary, launch, torchrun_command
from onebox.training.recipe import choose_strategy


def _losses(run) -> dict[int, float]:
    return {
        e["step"]: e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in e
    }


def _train(out, corpus_dir, *extra: str) -> int:
    return main(
        [
            "train",
            *MICRO_FLAGS,
            "--data",
            str(corpus_dir),
            "--device",
            "cpu",
            "--max-steps",
            "8",
            "--lr",
            "3e-3",
            "--warmup-steps",
            "2",
            "--eval-every",
            "0",
            "--ckpt-every",
            "4",
            "--log-every",
            "1",
            "--quiet",
            "--out-dir",
            str(out),
            *extra,
        ]
    )


def test_two_processes_match_one_and_a_two_process_run_resumes_on_one(tmp_path, corpus_dir):
    assert _train(tmp_path / "one", corpus_dir, "--batch-size", "8") == 0
    assert (
        _train(tmp_path / "two", corpus_dir, "--batch-size", "4", "--gpus", "2") == 0
    )  # 2 gloo processes x 4 = the same 8
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 9))
    assert all(abs(one[s] - two[s]) / one[s] < 1e-4 for s in one), (one, two)  # fp32; only the reduction order differs
    assert (
        main(
            [
                "train",
                "--resume",
                str(tmp_path / "two" / "ckpt_0000004.pt"),
                "--out-dir",
                str(tmp_path / "resumed"),
                "--quiet",
            ]
        )
        == 0
    )
    resumed = _losses(tmp_path / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8] and all(abs(resumed[s] - two[s]) / two[s] < 1e-4 for s in resumed), (
        resumed,
        two,
    )
    assert (
        main(["export", str(tmp_path / "two"), str(tmp_path / "hf")]) == 0
    )  # a sharded run's checkpoint exports like any other


def test_a_multi_process_checkpoint_is_sharded_pruned_whole_and_resumes_on_two(tmp_path, corpus_dir, capsys):
    run = tmp_path / "two"
    assert _train(run, corpus_dir, "--batch-size", "4", "--gpus", "2", "--keep-last", "1") == 0
    assert sorted(p.name for p in run.glob("ckpt_*")) == [
        "ckpt_0000008.dcp",
        "ckpt_0000008.pt",
    ]  # step 4's file and shards pruned together
    payload = load_checkpoint(run)
    assert (
        payload["sharded"] and "model" not in payload and payload["world"] == 2
    )  # the weights live only in the shards
    assert not list(run.glob(".*.tmp"))
    # the bf16 strategies keep other optimizer state: refused with a reason
    assert (
        main(
            [
                "train",
                "--resume",
                str(run),
                "--out-dir",
                str(tmp_path / "bf16"),
                "--memory",
                "bf16",
                "--max-steps",
                "10",
                "--quiet",
            ]
        )
        != 0
    )
    assert "holds the optimizer state of the standard memory strategy" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--resume",
                str(run),
                "--out-dir",
                str(tmp_path / "more"),
                "--max-steps",
                "10",
                "--gpus",
                "2",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    assert sorted(_losses(tmp_path / "more")) == [9, 10]


def test_torchrun_command_drops_the_gpus_flag():
    command = torchrun_command(2, ["train", "--gpus", "2", "--preset", "tiny", "--gpus=3"])
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in command
    assert command[-3:] == ["train", "--preset", "tiny"]
    with pytest.raises(OneboxError, match="at least 1"):
        torchrun_command(0, ["train"])


def test_benchmark_workers_have_their_own_entry_point(monkeypatch, capsys):
    from onebox.bench import workers

    command = torchrun_command(2, ["ceiling", "spec.json", "out.json"], "onebox.bench.workers")
    assert command[-5:] == ["-m", "onebox.bench.workers", "ceiling", "spec.json", "out.json"]
    assert workers.main(["train", "spec.json", "out.json"]) == 2 and "usage" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # --gpus inside a torchrun job would start torchrun in every process
    with pytest.raises(OneboxError, match="already one of a torchrun job"):
        launch(2, ["train", "--preset", "tiny"])


def test_launch_refuses_more_gpus_than_the_machine_has():
    import torch

    with pytest.raises(OneboxError, match="more GPUs than this machine has"):
        launch(torch.cuda.device_count() + 1, ["train", "--preset", "tiny"])


def test_a_failing_rank_is_named(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(60)\n")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0  # torchrun stopped the sleeping rank 0 too
    assert failure_summary(done.stderr, done.returncode) == "rank 1 failed first (exit code 3)"


SHARDED_HEAD = """
import sys
import torch, torch.distributed as dist
from onebox.config import ModelConfig
from onebox.distributed import shard_model
from onebox.model import build_model, cross_entropy_loss
dist.init_process_group("gloo")
torch.manual_seed(0)
model = build_model(ModelConfig(name="m", vocab_size=512, dim=64, hidden=160, layers=2, heads=4, kv_heads=2, seq_len=32), torch.device("cpu"), torch.float32)
x = torch.randint(0, 512, (2, 32))
y = torch.roll(x, -1, 1)
whole = cross_entropy_loss(model(x), y).item()
shard_model(model, False, group=int(sys.argv[2]))
loss = cross_entropy_loss(model.logits(model.hidden_states(x)), y)  # the compiled step's path
loss.backward()
grad = model.embed_tokens.weight.grad.full_tensor()
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.txt", "w") as out:  # one file each: the ranks' stdout lines can interleave
    out.write(f"rank {dist.get_rank()} whole {whole:.6f} sharded {loss.item():.6f} grad {grad.abs().sum().item():.6f}")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("group", [1, 2])
def test_the_compiled_steps_hidden_states_path_works_on_a_sharded_model(tmp_path, group):
    # the GPU path calls model.hidden_states and then the head: FSDP2 must gather the root's parameters for it
    # (group 2: both blocks in one FSDP2 unit)
    script = tmp_path / "head.py"
    script.write_text(SHARDED_HEAD)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(script),
            str(tmp_path),
            str(group),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(rows) == 2
    for row in rows:
        assert (
            abs(float(row[3]) - float(row[5])) < 1e-5 and float(row[7]) > 0
        )  # same loss as unsharded; the tied embedding got its gradient


def test_sharded_runs_take_the_strategy_asked_for_and_auto_is_planned_for_the_processes():
    def chosen(memory: str, saved: dict | None = None) -> str:
        train = TrainConfig(memory=memory, device="cpu", batch_size=2)
        return choose_strategy(micro_model(), train, torch.device("cpu"), 2, saved).name

    assert chosen("auto") == "standard" and chosen("checkpointed") == "checkpointed"
    assert chosen("bf16-checkpointed") == "bf16-checkpointed"
    with pytest.raises(OneboxError, match="unknown memory strategy"):
        chosen("nonsense")
    one_process = {"path": "run/ckpt_0000002.pt", "memory": "bf16", "sharded": False}
    with pytest.raises(OneboxError, match="written by one process"):
        chosen("auto", one_process)
    with pytest.raises(OneboxError, match="optimizer state of the bf16 memory strategy"):
        chosen("standard", one_process)


@pytest.mark.parametrize("memory", ["bf16", "bf16-checkpointed"])
def test_low_memory_strategies_train_sharded_and_resume_on_one_or_two(tmp_path, corpus_dir, memory, capsys):
    """The bf16 strategies under FSDP2: each process updates its own shards inside backward. Two processes
    track one with the same global batch (stochastic rounding and the per-process clipping estimates make
    them differ slightly), and a run saved on two resumes on one and on two. (The offload strategies need
    a GPU; their 8-bit moments' sharded checkpoint is tested in test_lowmem.py.)"""
    shape: list[str] = []
    assert _train(tmp_path / "one", corpus_dir, "--batch-size", "8", "--memory", memory, *shape) == 0
    assert _train(tmp_path / "two", corpus_dir, "--batch-size", "4", "--gpus", "2", "--memory", memory, *shape) == 0
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 9)) and two[8] < two[1] - 0.3  # it learned
    assert all(abs(one[s] - two[s]) / one[s] < 0.02 for s in one), (one, two)
    assert load_checkpoint(tmp_path / "two" / "ckpt_0000004.pt")["memory"] == memory
    for name, extra in (("on-one", []), ("on-two", ["--gpus", "2", "--device", "cpu"])):
        assert (
            main(
                [
                    "train",
                    "--resume",
                    str(tmp_path / "two" / "ckpt_0000004.pt"),
                    "--out-dir",
                    str(tmp_path / name),
                    "--quiet",
                    *extra,
                ]
            )
            == 0
        )
        resumed = _losses(tmp_path / name)
        assert sorted(resumed) == [5, 6, 7, 8], resumed
        assert abs(resumed[5] - two[5]) / two[5] < 1e-3, (resumed, two)  # the same weights and batch: the same loss
        assert all(abs(resumed[s] - two[s]) / two[s] < 0.02 for s in resumed), (
            resumed,
            two,
        )  # the first step measures again
    assert main(["export", str(tmp_path / "two"), str(tmp_path / "hf")]) == 0  # bf16 shards export like any checkpoint
    # another strategy's optimizer state is refused with a reason, not a traceback
    assert (
        main(
            [
                "train",
                "--resume",
                str(tmp_path / "two"),
                "--out-dir",
                str(tmp_path / "std"),
                "--memory",
                "standard",
                "--max-steps",
                "10",
                "--quiet",
            ]
        )
        != 0
    )
    assert "holds the optimizer state of the" in capsys.readouterr().err


def test_bench_validate_measures_the_scaling_over_processes(tmp_path):
    from onebox.bench.schema import read_document, validate_document

    out = tmp_path / "v.json"
    assert (
        main(
            [
                "bench",
                "validate",
                "--preset",
                "tiny",
                "--batch",
                "2",
                "--steps",
                "3",
                "--timed-steps",
                "2",
                "--gpus",
                "2",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = read_document(out)
    assert validate_document(doc) == []
    entry = doc["entries"][0]
    scaling, result = entry["scaling"], entry["scaling"]["result"]
    assert scaling["processes"] == 2 and result["processes"] == 2 and result["status"] == "ok"
    seq = entry["config"]["seq"]
    assert (
        abs(result["tokens_per_second"] - 2 * 2 * seq * 1000 / result["ms_per_step"]) / result["tokens_per_second"]
        < 0.01
    )  # both ranks' tokens
    assert scaling["efficiency"] == pytest.approx(
        result["tokens_per_second"] / 2 / entry["result"]["tokens_per_second"]
    )


def test_sharded_predictions_divide_the_state_but_not_the_activations():
    from onebox.plan import predict, strategy
    from onebox.presets import preset

    config = preset("10b")
    one, two = (predict(config, 1, strategy("checkpointed"), shards=n) for n in (1, 2))
    assert two.optimizer == one.optimizer // 2 and two.activations == one.activations
    assert (
        0.45 * one.gpu < two.gpu < 0.6 * one.gpu
    )  # the 16 bytes per parameter halve; activations and two bf16 blocks stay
    # The bf16 strategies divide too: weights, moments and the gradients of the parts stepped at step();
    # each process adds two gathered bf16 blocks and one block's reduce-scatter buffers.
    params, block = config.num_params(), (config.num_params() - config.vocab_size * config.dim) // config.layers
    alone, pair = (predict(config, 1, strategy("offload-int8"), shards=n) for n in (1, 2))
    assert (
        pair.weights == 2 * params // 2 + 4 * block
        and pair.host == alone.host // 2
        and pair.activations == alone.activations
    )
    assert 0.45 * alone.gpu < pair.gpu < 0.65 * alone.gpu  # one block's gradients and reduce buffers do not halve


def test_fsdp2_keeps_gathered_weights_only_where_they_fit():
    from onebox.plan import GPU_HEADROOM, MachineMemory, predict, reshard_after_forward, strategy
    from onebox.presets import preset

    standard, h100 = strategy("standard"), MachineMemory(80 * 10**9, 500 * 10**9, "80 GB")
    assert not reshard_after_forward(preset("3b-A"), 8, standard, h100, 2)  # ~34 GB sharded + 6 GB gathered: kept
    assert not reshard_after_forward(preset("7b"), 2, standard, h100, 2)  # 52 + 13 GB: still kept
    assert reshard_after_forward(preset("10b"), 1, standard, h100, 2)  # ~70 GB sharded + 19 GB gathered: regathered
    config = preset("1b-A")
    sharded = predict(config, 16, standard, shards=2).gpu
    gathered = 2 * (config.num_params() - config.vocab_size * config.dim)
    just = MachineMemory(int((sharded + gathered) / GPU_HEADROOM) + 10**9, 10**12, "just enough")
    assert not reshard_after_forward(config, 16, standard, just, 2)
    assert reshard_after_forward(config, 16, standard, MachineMemory(just.gpu - 2 * 10**9, 10**12, "a little less"), 2)


@pytest.mark.parametrize("memory", ["auto", "bf16-checkpointed"])
def test_bench_ceiling_trains_each_rung_on_several_processes(tmp_path, memory):
    from onebox.bench.schema import read_document, validate_document

    out = tmp_path / "c.json"
    assert (
        main(
            [
                "bench",
                "ceiling",
                "--ladder",
                "tiny",
                "--steps",
                "3",
                "--batch",
                "2",
                "--gpus",
                "2",
                "--device",
                "cpu",
                "--memory",
                memory,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = read_document(out)
    assert validate_document(doc) == [] and doc["settings"]["processes"] == 2
    entry = doc["entries"][0]
    result = entry["result"]
    assert (
        entry["strategy"] == ("standard" if memory == "auto" else memory)
        and result["status"] == "ok"
        and result["processes"] == 2
    )
    assert result["loss_end"] < result["loss_start"] and result["peak_memory_bytes"] > 0
    assert (
        abs(result["tokens_per_second"] - 2 * 2 * entry["config"]["seq"] * 1000 / result["ms_per_step"])
        / result["tokens_per_second"]
        < 0.01
    )


def test_a_rung_that_runs_out_of_memory_on_any_process_ends_the_sharded_climb(monkeypatch):
    from pathlib import Path

    import onebox.launch
    from onebox.bench.ceiling import run_ceiling

    tried = []

    def out_of_memory(processes, argv, module, device):  # as a rank that ran out would leave it
        job, spec, out = argv
        assert module == "onebox.bench.workers" and job == "ceiling" and device == "cpu"
        tried.append(json.loads(Path(spec).read_text())["strategy"])
        Path(out + ".oom1").write_text("out of memory")
        return 1

    monkeypatch.setattr(onebox.launch, "launch", out_of_memory)
    doc = run_ceiling(["tiny", "tiny"], torch.device("cpu"), lambda message: None, steps=2, processes=2)
    assert [e["result"]["status"] for e in doc["entries"]] == ["oom"]  # stopped after the first rung
    assert tried == [
        "standard",
        "checkpointed",
        "bf16",
        "bf16-checkpointed",
    ]  # every leaner sharded strategy was tried before giving up (no offload on the CPU)


def test_sharded_ceiling_counts_every_process_pinned_moments_against_the_one_host():
    from onebox.plan import MachineMemory, fits, plan, predict, strategy
    from onebox.presets import preset

    def fitting(machine: MachineMemory) -> list[str]:
        return [p.strategy.name for p in plan(config, 1, machine, True, shards=2)[1] if fits(p, machine, 2)]

    config = preset("30b")
    host = predict(config, 1, strategy("offload-int8"), True, True, 2).host  # one process's pinned 8-bit moments
    machine = MachineMemory(gpu=80 * 10**9, host=int(host * 1.5 / 0.8), label="test")  # room for one process's, not two
    assert "offload-int8" not in fitting(machine)
    roomy = MachineMemory(gpu=80 * 10**9, host=int(host * 2.5 / 0.8), label="test")
    assert "offload-int8" in fitting(roomy)


def test_plan_for_several_gpus_divides_the_model_and_shares_the_host(capsys):
    machine = ["--gpu-memory", "80", "--host-memory", "256"]
    assert main(["plan", "--preset", "50b", *machine]) == 1  # 100 GB of bf16 weights alone: not on one 80 GB GPU
    assert "nothing fits" in capsys.readouterr().out
    assert main(["plan", "--preset", "50b", *machine, "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "per process of 2" in out and "planned: offload," in out
    assert (
        main(["plan", "--preset", "50b", "--gpu-memory", "80", "--host-memory", "200", "--gpus", "2"]) == 0
    )  # 2 x 100 GB of bf16 moments: no
    assert "planned: offload-int8" in capsys.readouterr().out
    assert main(["plan", "--ladder", *machine, "--gpus", "2"]) == 0  # the ladder goes on past one GPU's 30b
    assert "predicted training ceiling: 60b (the top of the ladder)" in capsys.readouterr().out
    assert (
        main(["plan", "--ladder", "--gpu-memory", "80", "--host-memory", "128", "--gpus", "2"]) == 0
    )  # 2 x 59 GB of 8-bit moments: no
    assert "predicted training ceiling: 50b" in capsys.readouterr().out
    assert main(["plan", "--preset", "tiny", "--gpus", "0"]) == 1


@pytest.mark.parametrize("memory", ["standard", "bf16"])
def test_a_mixture_of_experts_trains_sharded_and_resumes_in_one_process(tmp_path, corpus_dir, memory):
    """FSDP2 over two processes shards the stacked experts like any parameter (the bf16 strategy updates
    its shards in backward); the sharded checkpoint resumes in one process, and the loss keeps falling."""
    moe = ["--family", "qwen3_moe", "--qk-norm", "true", "--experts", "4", "--experts-per-token", "2"]
    moe += ["--expert-hidden", "32", "--router-aux-loss-coef", "0.01", "--memory", memory]
    run = tmp_path / "moe"
    assert _train(run, corpus_dir, *moe, "--batch-size", "2", "--gpus", "2") == 0
    assert (run / "ckpt_0000008.dcp").is_dir()
    assert main(["train", "--resume", str(run), "--max-steps", "10", "--device", "cpu", "--quiet"]) == 0
    losses = _losses(run)
    assert sorted(losses)[-1] == 10 and all(math.isfinite(v) for v in losses.values())
    assert losses[10] < losses[1]
