"""Result documents: building, fingerprinting and the validation rules that reject impossible ones.

The schema is documented in docs/results-schema.md; bump SCHEMA_VERSION on incompatible changes.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import json
import math
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from onebox import __version__
from onebox.device import hardware_facts
from onebox.errors import OneboxError
from onebox.files import read_json, write_text_atomic

SCHEMA_VERSION = 1
BENCHMARKS = ("validate", "sweep", "forward", "dims", "ceiling", "decode", "serve", "moe")
TRAINING_BENCHMARKS = ("validate", "sweep")
TOP_FIELDS = (
    "schema_version",
    "onebox_version",
    "git_commit",
    "benchmark",
    "created_utc",
    "submitter",
    "hardware",
    "settings",
    "entries",
    "fingerprint",
)
HARDWARE_FIELDS = (
    "accelerator",
    "accelerator_memory_bytes",
    "driver",
    "cuda_version",
    "torch_version",
    "power_limit_watts",
    "cpu",
    "cpu_cores",
    "host_memory_bytes",
    "os",
)
CONFIG_FIELDS = ("name", "dim", "hidden", "heads", "kv_heads", "layers", "seq", "vocab", "params")
TRAINING_RESULT_FIELDS = (
    "status",
    "ms_per_step",
    "forward_ms",
    "backward_ms",
    "optimizer_ms",
    "tokens_per_second",
    "flops_per_token",
    "mfu",
    "peak_flops",
    "peak_memory_bytes",
    "avg_power_watts",
    "tokens_per_joule",
    "loss_start",
    "loss_end",
    "loss_delta",
    "loss_trace",
)
TOKENS_TOLERANCE = 0.05  # tokens/s vs batch x seq x 1000 / ms
PHASES_TOLERANCE = 0.25  # forward + backward + optimizer vs ms/step


def git_commit() -> str | None:
    """The commit of the onebox source tree, with '-dirty' when it has uncommitted changes; None outside git.

    ONEBOX_GIT_COMMIT overrides it, for copies of the tree without .git (e.g. on a remote GPU machine).
    """
    if os.environ.get("ONEBOX_GIT_COMMIT"):
        return os.environ["ONEBOX_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def new_document(benchmark: str, device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    """A result document with everything but the entries and the fingerprint filled in."""
    return {
        "schema_version": SCHEMA_VERSION,
        "onebox_version": __version__,
        "git_commit": git_commit(),
        "benchmark": benchmark,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "submitter": os.environ.get("ONEBOX_SUBMITTER") or getpass.getuser(),
        "hardware": hardware_facts(device),
        "settings": settings,
        "entries": [],
    }


def _canonical(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "fingerprint"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def fingerprint(doc: dict[str, Any]) -> str:
    """sha256 of the document's canonical JSON without its fingerprint field."""
    return hashlib.sha256(_canonical(doc)).hexdigest()


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    """Add the fingerprint (the last step before writing)."""
    doc = copy.deepcopy(doc)
    doc["fingerprint"] = fingerprint(doc)
    return doc


def config_record(config: Any) -> dict[str, Any]:
    """The configuration block of an entry."""
    return {
        "name": config.name,
        "dim": config.dim,
        "hidden": config.hidden,
        "heads": config.heads,
        "kv_heads": config.kv_heads,
        "layers": config.layers,
        "seq": config.seq_len,
        "vocab": config.vocab_size,
        "params": config.num_params(),
        "activation": config.activation,
        "tie_embeddings": config.tie_embeddings,
    }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _training_problems(where: str, entry: dict[str, Any], batch: Any) -> list[str]:
    problems: list[str] = []
    result = entry.get("result") or {}
    missing = [k for k in TRAINING_RESULT_FIELDS if k not in result]
    if missing:
        return [f"{where}: result lacks {missing}"]
    if result["status"] == "oom":
        return [] if "estimated_bytes" in result else [f"{where}: out-of-memory entry lacks estimated_bytes"]
    if result["status"] not in ("ok", "failed"):
        return [f"{where}: unknown status {result['status']!r}"]
    trace = result["loss_trace"]
    if (
        not trace
        or not all(_finite(x) for x in trace)
        or not all(_finite(result[k]) for k in ("loss_start", "loss_end"))
    ):
        problems.append(f"{where}: non-finite or missing losses")
    elif not result["loss_end"] < result["loss_start"]:
        problems.append(f"{where}: the loss did not fall ({result['loss_start']:.4f} -> {result['loss_end']:.4f})")
    ms, tps = result["ms_per_step"], result["tokens_per_second"]
    seq = (entry.get("config") or {}).get("seq")
    if not (_finite(ms) and ms > 0 and _finite(tps) and tps > 0 and _finite(batch) and _finite(seq)):
        problems.append(f"{where}: ms_per_step, tokens_per_second, batch and seq must be positive numbers")
        return problems
    expected = batch * seq * 1000.0 / ms
    if abs(tps - expected) / expected > TOKENS_TOLERANCE:
        problems.append(
            f"{where}: tokens/s {tps:.1f} is inconsistent with batch x seq x 1000 / ms = {expected:.1f} (over 5% apart)"
        )
    phases = [result[k] for k in ("forward_ms", "backward_ms", "optimizer_ms")]
    if not all(_finite(p) and p >= 0 for p in phases):
        problems.append(f"{where}: phase times must be non-negative numbers")
    elif abs(sum(phases) - ms) / ms > PHASES_TOLERANCE:
        problems.append(
            f"{where}: forward + backward + optimizer = {sum(phases):.1f} ms differs from ms/step {ms:.1f} by over 25%"
        )
    if _finite(result.get("mfu")) and result["mfu"] > 1.0:
        problems.append(f"{where}: MFU {result['mfu']:.0%} exceeds the device's peak: implausibly fast")
    return problems


def _ceiling_problems(where: str, entry: dict[str, Any]) -> list[str]:
    result = entry.get("result") or {}
    status = result.get("status")
    if status in ("oom", "does not fit"):
        return []
    if status not in ("ok", "failed"):
        return [f"{where}: unknown status {status!r}"]
    trace = result.get("loss_trace") or []
    if not trace or not all(_finite(x) for x in trace):
        return [f"{where}: non-finite or missing losses"]
    problems = (
        []
        if status == "failed" or trace[-1] < trace[0]
        else [f"{where}: the loss did not fall ({trace[0]:.4f} -> {trace[-1]:.4f})"]
    )
    ms, tps, batch, seq = (
        result.get("ms_per_step"),
        result.get("tokens_per_second"),
        entry.get("batch"),
        (entry.get("config") or {}).get("seq"),
    )
    if not all(_finite(v) and v > 0 for v in (ms, tps, batch, seq)):
        return problems + [f"{where}: ms_per_step, tokens_per_second, batch and seq must be positive numbers"]
    if abs(tps - batch * seq * 1000.0 / ms) / tps > TOKENS_TOLERANCE:
        problems.append(f"{where}: tokens/s {tps:.1f} is inconsistent with batch x seq x 1000 / ms (over 5% apart)")
    return problems


def validate_document(doc: Any) -> list[str]:
    """Every reason to reject a document (empty when it is acceptable)."""
    if not isinstance(doc, dict):
        return ["the document is not a JSON object"]
    missing = [k for k in TOP_FIELDS if k not in doc]
    if missing:
        return [f"missing fields {missing}"]
    problems: list[str] = []
    if doc["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {doc['schema_version']} is not {SCHEMA_VERSION}")
    if doc["benchmark"] not in BENCHMARKS:
        problems.append(f"unknown benchmark {doc['benchmark']!r}")
    hardware_missing = [k for k in HARDWARE_FIELDS if k not in (doc["hardware"] or {})]
    if hardware_missing:
        problems.append(f"hardware lacks {hardware_missing}")
    if doc["fingerprint"] != fingerprint(doc):
        problems.append("the fingerprint does not match the content (the document was changed after it was written)")
    entries = doc["entries"]
    if not isinstance(entries, list) or not entries:
        return problems + ["the document has no entries"]
    for i, entry in enumerate(entries):
        where = f"entry {i} ({(entry.get('config') or {}).get('name', entry.get('dim', '?'))})"
        if doc["benchmark"] in ("validate", "sweep", "forward", "ceiling", "decode", "serve", "moe"):
            config_missing = [k for k in CONFIG_FIELDS if k not in (entry.get("config") or {})]
            if config_missing:
                problems.append(f"{where}: config lacks {config_missing}")
                continue
        if doc["benchmark"] in TRAINING_BENCHMARKS:
            problems += _training_problems(where, entry, entry.get("batch"))
        elif doc["benchmark"] == "forward":
            result = entry.get("result") or {}
            if result.get("status") == "ok" and not (_finite(result.get("ms_per_pass")) and result["ms_per_pass"] > 0):
                problems.append(f"{where}: a completed forward rung needs a positive ms_per_pass")
        elif doc["benchmark"] == "ceiling":
            problems += _ceiling_problems(where, entry)
        elif doc["benchmark"] == "serve":
            result = entry.get("result") or {}
            keys = ("tokens_per_second", "ttft_p50_ms", "ttft_p95_ms", "latency_p50_ms", "latency_p95_ms")
            if not all(_finite(result.get(k)) and result[k] > 0 for k in keys):
                problems.append(f"{where}: a serve entry needs positive tokens/s and latencies")
            elif result["ttft_p95_ms"] < result["ttft_p50_ms"] or result["latency_p95_ms"] < result["latency_p50_ms"]:
                problems.append(f"{where}: a 95th percentile below its median")
        elif doc["benchmark"] in ("decode", "moe"):
            result = entry.get("result") or {}
            if not all(
                _finite(result.get(k)) and result[k] > 0
                for k in ("prefill_tokens_per_second", "decode_tokens_per_second")
            ):
                problems.append(f"{where}: a decode entry needs positive prefill and decode tokens/s")
            elif _finite(result.get("floor_fraction")) and result["floor_fraction"] > 1.1:
                problems.append(
                    f"{where}: decode at {result['floor_fraction']:.0%} of its copy floor: implausibly fast"
                )
            elif _finite(result.get("bound_fraction")) and result["bound_fraction"] > 1.1:
                problems.append(
                    f"{where}: decode at {result['bound_fraction']:.0%} of the memory-bandwidth bound: implausibly fast"
                )
        elif doc["benchmark"] == "dims":
            if not (
                _finite(entry.get("ms")) and entry["ms"] > 0 and _finite(entry.get("flops")) and entry["flops"] > 0
            ):
                problems.append(f"{where}: a dimension point needs positive ms and flops")
    return problems


def check_document(doc: Any, name: str = "document") -> None:
    """Raise OneboxError listing every problem of a document."""
    problems = validate_document(doc)
    if problems:
        raise OneboxError(f"{name} is rejected: " + "; ".join(problems) + ".")


def write_document(doc: dict[str, Any], path: str | Path) -> Path:
    """Seal and write a document as indented JSON (atomically). Failed runs are written too;
    `onebox results add` is where documents are validated."""
    return write_text_atomic(path, json.dumps(seal(doc), indent=1, allow_nan=True))


def default_result_path(doc: dict[str, Any], label: str, folder: str | Path = "results") -> Path:
    """results/<benchmark>-<label>-<device>-<UTC time>.json"""
    hardware = doc["hardware"]
    device = hardware.get("accelerator") or "cpu"
    slug = "".join(ch if ch.isalnum() else "-" for ch in device.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = doc["created_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")
    return Path(folder) / f"{doc['benchmark']}-{label}-{slug}-{stamp}.json"


def read_document(path: str | Path) -> dict[str, Any]:
    """Load a result document (not yet validated)."""
    return read_json(path, "result file")
