"""Benchmarks on CPU: the result schema and each rejection rule, the store, the report, tiny runs end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from onebox.bench.dims import find_cliffs, layer_config, layer_flops, run_dims
from onebox.bench.forward import run_forward
from onebox.bench.report import build_report
from onebox.bench.schema import (
    check_document,
    read_document,
    seal,
    validate_document,
    write_document,
)
from onebox.bench.store import ResultStore
from onebox.bench.training import BenchSettings, measure_training
from onebox.bench.validate import run_sweep, run_validate, summarize_sweep
from onebox.cli import main
from onebox.config import ModelConfig, apply_overrides
from onebox.errors import OneboxError
from onebox.presets import preset

CPU = torch.device("cpu")
SAY = lambda message: None  # noqa: E731


def small(name="small", **changes) -> ModelConfig:
    base = dict(name=name, vocab_size=256, dim=64, hidden=128, layers=2, heads=2, seq_len=32)
    base.update(changes)
    return ModelConfig(**base).validate()


@pytest.fixture(scope="module")
def validate_doc():
    settings = BenchSettings(batch=4, steps=6, timed_steps=3, lr=3e-3)
    return seal(run_validate(small(), CPU, settings, None, SAY))


def test_validate_run_produces_an_acceptable_document(validate_doc):
    assert validate_document(validate_doc) == []
    result = validate_doc["entries"][0]["result"]
    assert result["status"] == "ok" and result["loss_end"] < result["loss_start"]
    assert result["tokens_per_second"] == pytest.approx(4 * 32 * 1000 / result["ms_per_step"])
    assert (
        result["mfu"] is None and result["avg_power_watts"] is None and result["tokens_per_joule"] is None
    )  # CPU: n/a
    assert result["peak_memory_bytes"] > 0 and len(result["loss_trace"]) == 9
    hardware = validate_doc["hardware"]
    assert hardware["torch_version"] == torch.__version__ and hardware["cpu_cores"] >= 1


def _tamper(doc, change):
    doc = copy.deepcopy(doc)
    change(doc)
    return seal(doc)


def _result(doc):
    return doc["entries"][0]["result"]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: _result(d).update(tokens_per_second=_result(d)["tokens_per_second"] * 1.2),
            "inconsistent with batch x seq",
        ),
        (lambda d: _result(d).update(loss_end=_result(d)["loss_start"] + 0.1), "did not fall"),
        (lambda d: _result(d)["loss_trace"].__setitem__(2, float("nan")), "non-finite"),
        (
            lambda d: _result(d).update(backward_ms=_result(d)["backward_ms"] + _result(d)["ms_per_step"]),
            "differs from ms/step",
        ),
        (lambda d: _result(d).pop("optimizer_ms"), "result lacks"),
        (lambda d: d.pop("hardware"), "missing fields"),
        (lambda d: d["hardware"].pop("driver"), "hardware lacks"),
        (lambda d: d["entries"][0]["config"].pop("params"), "config lacks"),
        (lambda d: _result(d).update(mfu=1.5), "implausibly fast"),
        (lambda d: d.update(entries=[]), "no entries"),
    ],
)
def test_each_rejection_rule(validate_doc, change, message):
    problems = validate_document(_tamper(validate_doc, change))
    assert any(message in p for p in problems), problems


def test_a_changed_document_fails_its_fingerprint(validate_doc):
    doc = copy.deepcopy(validate_doc)
    _result(doc)["ms_per_step"] *= 0.5
    _result(doc)["tokens_per_second"] *= 2
    assert any("fingerprint" in p for p in validate_document(doc))


def test_store_adds_once_and_rejects_bad_documents(tmp_path, validate_doc):
    path = write_document(validate_doc, tmp_path / "a.json")
    store = ResultStore(tmp_path / "db.sqlite")
    assert store.add_file(path) is True
    assert store.add_file(path) is False
    bad = _tamper(validate_doc, lambda d: _result(d).update(loss_end=99.0))
    with pytest.raises(OneboxError, match="rejected: .*did not fall"):
        store.add(bad)
    assert len(store.documents()) == 1
    (name, params) = store.leaderboard()[0][1:3]
    assert name == "small" and params == small().num_params()
    store.close()


def test_results_cli_reports_rejections(tmp_path, validate_doc, capsys):
    good = write_document(validate_doc, tmp_path / "good.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_tamper(validate_doc, lambda d: _result(d).update(tokens_per_second=1.0))))
    assert main(["results", "add", str(good), str(bad), "--db", str(tmp_path / "db.sqlite")]) == 1
    captured = capsys.readouterr()
    assert "added" in captured.out and "rejected" in captured.err and "inconsistent" in captured.err
    assert main(["results", "list", "--db", str(tmp_path / "db.sqlite")]) == 0


def test_out_of_memory_is_recorded_with_the_estimate(monkeypatch):
    import onebox.bench.training as training

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(training, "build_onebox", no_memory)
    result = measure_training("onebox", small(), CPU, BenchSettings(batch=2))
    assert result["status"] == "oom" and result["estimated_bytes"] > small().num_params() * 16


def test_tiny_sweep_end_to_end(monkeypatch):
    import onebox.bench.validate as validate

    tiny_shapes = {
        f"600m-{v}": small(f"600m-{v}", layers=depth, dim=d, heads=d // 32, seq_len=16 if v == "E" else 32)
        for v, d, depth in (("A", 64, 2), ("B", 32, 3), ("C", 96, 1), ("D", 64, 2), ("E", 64, 2))
    }
    monkeypatch.setattr(validate, "preset", lambda name: tiny_shapes[name])
    doc = seal(run_sweep(["600m"], CPU, BenchSettings(batch=2, steps=4, timed_steps=2, lr=3e-3), None, SAY))
    assert [e["config"]["name"] for e in doc["entries"]] == list(tiny_shapes)
    assert validate_document(doc) == []
    assert doc["summary"]["best_per_scale"]["600m"]["name"] in tiny_shapes
    assert doc["summary"]["wide_vs_deep"][0]["scale"] == "600m"


def test_sweep_summary_finds_the_crossover():
    def entry(name, tps):
        return {
            "config": {"name": name, "params": 1},
            "result": {
                "status": "ok",
                "tokens_per_second": tps,
                "ms_per_step": 1,
                "mfu": None,
                "peak_memory_bytes": 1,
                "avg_power_watts": None,
                "tokens_per_joule": None,
            },
        }

    entries = [entry("1b-B", 100), entry("1b-C", 120), entry("3b-B", 60), entry("3b-C", 50)]
    summary = summarize_sweep(entries)
    assert summary["deep_wins_from"] == "3b" and summary["best_per_scale"]["1b"]["name"] == "1b-C"


def test_forward_ladder_on_cpu():
    doc = seal(run_forward(["tiny", "48m"], CPU, "auto", SAY, passes=2))
    assert validate_document(doc) == []
    assert [e["config"]["name"] for e in doc["entries"]] == ["tiny", "48m"]
    assert all(e["result"]["status"] == "ok" and len(e["result"]["pass_ms"]) == 2 for e in doc["entries"])


def test_forward_ladder_stops_at_the_first_out_of_memory(monkeypatch):
    import onebox.bench.forward as forward

    real = forward.build_random_model

    def limited(config, device, dtype):
        if config.num_params() > 10e6:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return real(config, device, dtype)

    monkeypatch.setattr(forward, "build_random_model", limited)
    doc = run_forward(["tiny", "48m", "600m-A"], CPU, "auto", SAY, passes=1)
    assert [e["result"]["status"] for e in doc["entries"]] == ["ok", "oom"]


def test_dims_scan_and_cliff_detection():
    doc = seal(run_dims([128, 256], CPU, "auto", SAY, batch=2, seq=32, repeats=2, iters=2, warmup=1))
    assert validate_document(doc) == []
    assert [p["dim"] for p in doc["entries"]] == [128, 256] and doc["noise"] >= 0
    points = [{"dim": d, "ns_per_gflop": t} for d, t in ((1024, 1.0), (1280, 1.01), (1536, 1.5), (1792, 1.48))]
    cliffs = find_cliffs(points, noise=0.02)
    assert [(c["from_dim"], c["to_dim"]) for c in cliffs] == [(1280, 1536)]
    assert find_cliffs(points, noise=0.2) == []  # a 50% step inside 3 x 20% noise is not a cliff


def test_layer_flops_counts_matmuls_and_attention():
    config = layer_config(1024)
    assert config.hidden == 2688 and config.heads == 8
    assert layer_flops(config, 100) == 6 * (4 * 1024**2 + 3 * 1024 * 2688) * 100 + 12 * 1024 * 512 * 100


def test_report_from_synthetic_documents(tmp_path, validate_doc):
    sweep = copy.deepcopy(validate_doc)
    sweep["benchmark"] = "sweep"
    sweep["summary"] = summarize_sweep(sweep["entries"])
    forward = seal(run_forward(["tiny"], CPU, "auto", SAY, passes=1))
    dims = seal(run_dims([128, 256], CPU, "auto", SAY, batch=1, seq=16, repeats=2, iters=1, warmup=0))
    md, page = build_report([validate_doc, seal(sweep), forward, dims], tmp_path / "report")
    text = md.read_text()
    for heading in ("## Training", "## Best per scale", "## Forward ladder", "## Dimension scan", "## Cliffs"):
        assert heading in text
    assert (tmp_path / "report" / "tokens_per_second.png").read_bytes()[:4] == b"\x89PNG"
    html = page.read_text()
    # tokens/s, peak memory, forward ladder, dims; MFU and tokens/J are n/a on a CPU, so not plotted
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html


def test_bench_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "v.json"
    code = main(
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
            "--lr",
            "3e-3",
            "--seq-len",
            "32",
            "--layers",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny — 256d/768h/1L/seq32" in printed and "ms/step (fwd=" in printed and "MFU n/a" in printed
    check_document(read_document(out))
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()


def test_bench_cli_bad_input(capsys):
    assert main(["bench", "dims", "--dims", "100:200"]) == 1
    assert "START:STOP:STEP" in capsys.readouterr().err
    assert main(["bench", "sweep", "--scales", "9b"]) == 1
    assert "unknown sweep scale" in capsys.readouterr().err
    assert main(["report", "/nonexistent.json"]) == 1


def test_preset_overrides_in_validate_keep_the_name():
    assert apply_overrides(preset("tiny"), {"layers": "1"}).name == "tiny"


def test_forward_probe_model_allocates_only_its_dtype_and_keeps_fp32_rope():
    from onebox.bench.forward import build_random_model

    model = build_random_model(small(), CPU, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cos.dtype == torch.float32 and model.rope_cos.abs().max() > 0


def test_streamed_forward_gives_the_resident_logits_pass_after_pass():
    from onebox.infer.stream import build_streamed
    from onebox.model import Transformer

    config = small(layers=5)
    for resident in (0, 2, 5):  # all streamed, mixed, nothing streamed
        streamed = build_streamed(config, CPU, torch.float32, resident)
        reference = Transformer(config).eval()
        reference.load_state_dict(streamed.model.state_dict())
        assert len(streamed.streamed) == 5 - resident
        for seed in (1, 2):  # fresh tokens each pass; the two buffers are refilled every pass
            idx = torch.randint(
                0, config.vocab_size, (2, config.seq_len), generator=torch.Generator().manual_seed(seed)
            )
            with torch.no_grad():
                expected = reference(idx)
            assert torch.equal(streamed(idx), expected)


def test_forward_ladder_streams_the_rungs_past_the_budget():
    tiny_bytes = preset("tiny").num_params() * 4
    doc = seal(run_forward(["tiny", "48m"], CPU, "fp32", SAY, passes=1, budget=tiny_bytes + 2**20))
    first, second = (e["result"] for e in doc["entries"])
    assert first["status"] == "ok" and not first["streamed"]
    assert second["status"] == "ok" and second["streamed"] and second["streamed_blocks"] > 0
    from onebox.model import Block

    block_bytes = sum(p.numel() for p in Block(preset("48m")).parameters()) * 4
    assert second["streamed_bytes"] == second["streamed_blocks"] * block_bytes
    assert validate_document(doc) == []


def test_results_of_several_processes_are_filed_apart_from_one_gpus():
    from onebox.bench.store import device_of

    doc = {"hardware": {"accelerator": "NVIDIA H200"}, "settings": {"processes": 2}}
    assert device_of(doc) == "2 x NVIDIA H200"
    assert device_of({**doc, "settings": {"batch": 1}}) == "NVIDIA H200"


def test_the_training_baseline_is_transformers_model_of_the_same_family():
    """bench validate --baseline builds the family's own transformers class (here Qwen3, with its q/k norms)."""
    from onebox.bench.training import build_hf

    config = ModelConfig(
        name="q",
        family="qwen3",
        qk_norm=True,
        head_dim=32,
        vocab_size=256,
        dim=64,
        hidden=128,
        layers=2,
        heads=4,
        kv_heads=2,
        seq_len=32,
    ).validate()
    contender = build_hf(config, CPU, BenchSettings(batch=2), compile_model=False)
    assert type(contender.model).__name__ == "Qwen3ForCausalLM"
    assert sum(p.numel() for p in contender.model.parameters()) == config.num_params()
    result = measure_training("hf", config, CPU, BenchSettings(batch=2, steps=3, timed_steps=1))
    assert result["status"] == "ok" and result["tokens_per_second"] > 0


def test_the_decode_bound_counts_the_experts_a_step_reads():
    """Dense: every weight. Mixture of experts: the active weights at batch 1 (k experts a layer), more
    distinct experts as the batch grows, never more than every weight."""
    from onebox.bench.decode import step_bytes

    dense = preset("llama3.2-1b")
    assert step_bytes(dense, 2 * dense.num_params(), 8) == 2 * dense.num_params()
    moe = preset("qwen3-30b-a3b")
    total = 2 * moe.num_params()
    assert step_bytes(moe, total, 1) == pytest.approx(2 * moe.num_active_params())
    batch8 = step_bytes(moe, total, 8)
    assert 2 * moe.num_active_params() < batch8 < total and step_bytes(moe, total, 4096) == pytest.approx(total)
