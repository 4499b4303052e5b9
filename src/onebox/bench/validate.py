"""`onebox bench validate` and `onebox bench sweep`: training benchmarks, printed and written as documents."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from onebox.bench.schema import config_record, new_document
from onebox.bench.training import BASELINES, BenchSettings, measure_training
from onebox.config import ModelConfig, config_dict
from onebox.device import format_bytes
from onebox.errors import OneboxError
from onebox.presets import SWEEP_SCALES, preset, sweep_presets

# Micro-batch per sweep scale: the batches of the transformers anchors (1.5b in between).
SWEEP_BATCH = {"600m": 32, "1b": 16, "1.5b": 12, "3b": 8, "5b": 4}

Say = Callable[[str], None]


def _n(value: float | None, fmt: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{suffix}"


def result_line(label: str, result: dict[str, Any]) -> str:
    """One Rustane-style line: ms/step split into phases, tokens/s, MFU, memory, power, tokens/J, loss."""
    if result["status"] == "oom":
        return f"  {label:<11} out of memory (estimated need {format_bytes(result['estimated_bytes'])})"
    status = "" if result["status"] == "ok" else "  FAILED: the loss did not fall"
    if result.get("memory_strategy", "standard") != "standard":
        status += f" | memory {result['memory_strategy']}"
    return (
        f"  {label:<11} {result['ms_per_step']:,.1f}ms/step (fwd={result['forward_ms']:,.1f} bwd={result['backward_ms']:,.1f} "
        f"opt={result['optimizer_ms']:,.1f}) = {result['tokens_per_second']:,.0f} tok/s | MFU {_n(result['mfu'], '.1%')} | "
        f"mem {format_bytes(result['peak_memory_bytes'])} | {_n(result['avg_power_watts'], ',.0f', ' W')} | "
        f"{_n(result['tokens_per_joule'], ',.0f', ' tok/J')} | loss {result['loss_start']:.3f} -> {result['loss_end']:.3f}{status}"
    )


def _ratios(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    if result["status"] == "oom" or baseline["status"] == "oom":
        return {"tokens_per_second": None, "peak_memory": None}
    return {
        "tokens_per_second": result["tokens_per_second"] / baseline["tokens_per_second"],
        "peak_memory": result["peak_memory_bytes"] / baseline["peak_memory_bytes"],
    }


def run_entry(
    config: ModelConfig, device: torch.device, settings: BenchSettings, baseline: str | None, say: Say
) -> dict[str, Any]:
    """Benchmark one configuration (and its baseline): the entry of a training document."""
    if baseline is not None and baseline not in BASELINES:
        raise OneboxError(f"unknown baseline {baseline!r}: use {' or '.join(BASELINES)}.")
    say(f"{config.name} — {config.shape()} — ~{config.num_params() / 1e6:,.0f}M params — batch {settings.batch}")
    result = measure_training("onebox", config, device, settings)
    say(result_line("onebox", result))
    entry: dict[str, Any] = {
        "config": config_record(config),
        "batch": settings.batch,
        "result": result,
        "baseline": None,
    }
    if baseline is not None:
        other = measure_training(baseline, config, device, settings)
        say(result_line(baseline, other))
        ratios = _ratios(result, other)
        entry["baseline"] = {"kind": baseline, "result": other, "ratios": ratios}
        if ratios["tokens_per_second"] is not None:
            say(
                f"  onebox / {baseline}: tokens/s {ratios['tokens_per_second']:.2f}x, peak memory {ratios['peak_memory']:.2f}x"
            )
    return entry


def add_scaling(
    doc: dict[str, Any], processes: int, config: ModelConfig, device: str, settings: BenchSettings, say: Say
) -> None:
    """Run the same measurement on `processes` processes (torchrun + FSDP2: `onebox.bench.workers validate`)
    and record the scaling against one."""
    from onebox.launch import run_job

    entry = doc["entries"][0]
    spec = {"model": config_dict(config), "device": device, "settings": dataclasses.asdict(settings)}
    with tempfile.TemporaryDirectory() as folder:
        code, out = run_job(processes, "onebox.bench.workers", "validate", spec, Path(folder))
        if code != 0 or not out.is_file():
            raise OneboxError(f"the {processes}-process measurement failed (its error is printed above).")
        result = json.loads(out.read_text())
    one = entry["result"]
    scaling: dict[str, Any] = {
        "processes": processes,
        "result": result,
        "tokens_per_second_per_process": None,
        "efficiency": None,
    }
    if result["status"] == "ok" and one["status"] == "ok":
        scaling["tokens_per_second_per_process"] = result["tokens_per_second"] / processes
        scaling["efficiency"] = scaling["tokens_per_second_per_process"] / one["tokens_per_second"]
    entry["scaling"] = scaling
    say(result_line(f"{processes} procs", result))
    if scaling["efficiency"] is not None:
        say(
            f"  {processes} processes: {scaling['tokens_per_second_per_process']:,.0f} tok/s per process = {scaling['efficiency']:.1%} scaling efficiency against one"
        )


def _settings_record(settings: BenchSettings, baseline: str | None) -> dict[str, Any]:
    return {
        "batch": settings.batch,
        "steps": settings.steps,
        "timed_steps": settings.timed_steps,
        "precision": settings.precision,
        "compile": settings.compile,
        "lr": settings.lr,
        "seed": settings.seed,
        "memory": settings.memory,
        "baseline": baseline,
        "tokens": "fixed synthetic batch",
    }


def run_validate(
    config: ModelConfig, device: torch.device, settings: BenchSettings, baseline: str | None, say: Say
) -> dict[str, Any]:
    """The `validate` document of one configuration."""
    doc = new_document("validate", device, _settings_record(settings, baseline))
    doc["entries"].append(run_entry(config, device, settings, baseline, say))
    return doc


def run_sweep(
    scales: list[str],
    device: torch.device,
    base: BenchSettings,
    baseline: str | None,
    say: Say,
    batch: int | None = None,
) -> dict[str, Any]:
    """The `sweep` document: five variants per scale; configurations that do not fit are recorded as such."""
    for scale in scales:
        if scale not in SWEEP_SCALES:
            raise OneboxError(f"unknown sweep scale {scale!r}. Known scales: {', '.join(SWEEP_SCALES)}.")
    doc = new_document("sweep", device, {**_settings_record(base, baseline), "batch": batch, "scales": scales})
    for scale in scales:
        for name in sweep_presets(scale):
            settings = BenchSettings(**{**base.__dict__, "batch": batch or SWEEP_BATCH[scale]})
            doc["entries"].append(run_entry(preset(name), device, settings, baseline, say))
    doc["summary"] = summarize_sweep(doc["entries"])
    for line in summary_lines(doc["summary"]):
        say(line)
    return doc


def summarize_sweep(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Best variant per scale, and where wide+shallow (C) stops beating deep+narrow (B)."""
    best: dict[str, Any] = {}
    by_name = {e["config"]["name"]: e for e in entries}
    scales = list(dict.fromkeys(name.rsplit("-", 1)[0] for name in by_name))
    for scale in scales:
        fitted = [e for e in entries if e["config"]["name"].startswith(f"{scale}-") and e["result"]["status"] == "ok"]
        if fitted:
            top = max(fitted, key=lambda e: e["result"]["tokens_per_second"])
            r = top["result"]
            best[scale] = {
                "name": top["config"]["name"],
                "params": top["config"]["params"],
                "tokens_per_second": r["tokens_per_second"],
                "ms_per_step": r["ms_per_step"],
                "mfu": r["mfu"],
                "peak_memory_bytes": r["peak_memory_bytes"],
                "avg_power_watts": r["avg_power_watts"],
                "tokens_per_joule": r["tokens_per_joule"],
            }
        else:
            best[scale] = None
    wide_vs_deep = []
    for scale in scales:
        wide, deep = by_name.get(f"{scale}-C"), by_name.get(f"{scale}-B")
        if wide and deep and wide["result"]["status"] == "ok" and deep["result"]["status"] == "ok":
            ratio = wide["result"]["tokens_per_second"] / deep["result"]["tokens_per_second"]
            wide_vs_deep.append(
                {
                    "scale": scale,
                    "wide_over_deep": ratio,
                    "winner": "wide+shallow (C)" if ratio > 1 else "deep+narrow (B)",
                }
            )
    crossover = next((row["scale"] for row in wide_vs_deep if row["wide_over_deep"] <= 1), None)
    return {"best_per_scale": best, "wide_vs_deep": wide_vs_deep, "deep_wins_from": crossover}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The printed summary of a sweep."""
    lines = ["", "best per scale:"]
    for scale, best in summary["best_per_scale"].items():
        if best is None:
            lines.append(f"  {scale:<5} nothing fitted")
        else:
            lines.append(
                f"  {scale:<5} {best['name']:<7} {best['tokens_per_second']:,.0f} tok/s | MFU {_n(best['mfu'], '.1%')} | "
                f"mem {format_bytes(best['peak_memory_bytes'])} | {_n(best['tokens_per_joule'], ',.0f', ' tok/J')}"
            )
    for row in summary["wide_vs_deep"]:
        lines.append(
            f"  {row['scale']:<5} wide+shallow / deep+narrow tokens/s = {row['wide_over_deep']:.2f}: {row['winner']} wins"
        )
    if summary["wide_vs_deep"]:
        where = summary["deep_wins_from"]
        lines.append(
            f"  deep+narrow wins from {where} on" if where else "  wide+shallow wins at every scale that fitted"
        )
    return lines
