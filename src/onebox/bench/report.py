"""`onebox report`: Markdown and one self-contained HTML page of tables and matplotlib plots."""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from onebox.bench.store import device_of


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "ms":
        return f"{value:,.1f}"
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "gb":
        return f"{value / 1e9:.1f} GB"
    if kind == "params":
        return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.0f}M"
    if kind == "x":
        return f"{value:.2f}x"
    return str(value)


def _variant(name: str) -> str:
    return name.rsplit("-", 1)[1] if "-" in name and name.rsplit("-", 1)[1] in "ABCDE" else name


def _precision(doc: dict[str, Any], device: str) -> str:
    """The precision a training document ran at, with auto resolved as the code does (bf16 on CUDA, fp32 elsewhere)."""
    precision = doc.get("settings", {}).get("precision", "auto")
    if precision != "auto":
        return precision
    return "bf16" if doc["hardware"].get("accelerator") and not device.startswith("Apple") else "fp32"


def training_rows(docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per training entry of validate and sweep documents."""
    rows = []
    for doc in docs:
        if doc["benchmark"] not in ("validate", "sweep"):
            continue
        for entry in doc["entries"]:
            r, c = entry["result"], entry["config"]
            baseline = entry.get("baseline") or {}
            rows.append(
                {
                    "device": device_of(doc),
                    "precision": _precision(doc, device_of(doc)),
                    "commit": _commit(doc),
                    "name": c["name"],
                    "shape": f"{c['dim']}d/{c['hidden']}h/{c['layers']}L/seq{c['seq']}",
                    "params": c["params"],
                    "batch": entry["batch"],
                    "status": r["status"],
                    "ms": r.get("ms_per_step"),
                    "tokens_per_second": r.get("tokens_per_second"),
                    "mfu": r.get("mfu"),
                    "memory": r.get("peak_memory_bytes") or r.get("estimated_bytes"),
                    "watts": r.get("avg_power_watts"),
                    "tokens_per_joule": r.get("tokens_per_joule"),
                    "baseline": baseline.get("kind"),
                    "ratio": (baseline.get("ratios") or {}).get("tokens_per_second"),
                }
            )
    return rows


def _commit(doc: dict[str, Any]) -> str:
    commit = (doc.get("git_commit") or "")[:7]
    return commit if all(c in "0123456789abcdef" for c in commit) else "n/a"  # early documents hold a ref, not a commit


def _latest_entries(docs: Iterable[dict[str, Any]], benchmark: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The entries of one benchmark, the newest document's per device, model and batch (a rerun supersedes), by device then size."""
    latest: dict[tuple[str, str, int], tuple[dict[str, Any], dict[str, Any]]] = {}
    for doc in sorted((d for d in docs if d["benchmark"] == benchmark), key=lambda d: d.get("created_utc", "")):
        for entry in doc["entries"]:
            latest[(device_of(doc), entry["config"]["name"], entry["batch"])] = (doc, entry)
    return sorted(latest.values(), key=lambda de: (device_of(de[0]), de[1]["config"]["params"], de[1]["batch"]))


def _streamed(result: dict[str, Any]) -> str:
    if not result.get("streamed"):
        return "resident"
    text = f"{result['streamed_blocks']} blocks streamed ({_fmt(result['streamed_bytes'], 'gb')})"
    return text + (f", {result['over_floor']:.2f}x the copy floor" if result.get("over_floor") else "")


def _table(headers: list[str], rows: list[list[str]]) -> tuple[str, str]:
    md = "| " + " | ".join(headers) + " |\n| " + " | ".join("---" for _ in headers) + " |\n"
    md += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return md, f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plot(
    series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str, logx: bool = True
) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, points in sorted(series.items()):
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def build_report(docs: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md (with PNG files beside it) and report.html (images inlined); return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_parts = [
        "# onebox benchmark report\n",
        f"{len(docs)} result documents from {len({device_of(d) for d in docs})} device(s).\n",
    ]
    html_parts = [
        "<h1>onebox benchmark report</h1>",
        f"<p>{len(docs)} result documents from {len({device_of(d) for d in docs})} device(s).</p>",
    ]
    figures: list[tuple[str, bytes]] = []

    def section(title: str, headers: list[str], rows: list[list[str]], note: str = "") -> None:
        md, table = _table(headers, rows)
        md_parts.append(f"\n## {title}\n\n{note}\n\n{md}" if note else f"\n## {title}\n\n{md}")
        html_parts.append(f"<h2>{html.escape(title)}</h2>" + (f"<p>{html.escape(note)}</p>" if note else "") + table)

    def figure(name: str, png: bytes | None) -> None:
        if png is not None:
            figures.append((name, png))
            md_parts.append(f"\n![{name}]({name}.png)\n")
            html_parts.append(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')

    train = training_rows(docs)
    if train:
        section(
            "Training",
            [
                "device",
                "precision",
                "commit",
                "config",
                "shape",
                "params",
                "batch",
                "ms/step",
                "tok/s",
                "MFU",
                "peak memory",
                "W",
                "tok/J",
                "vs baseline",
            ],
            [
                [
                    r["device"],
                    r["precision"],
                    r["commit"],
                    r["name"],
                    r["shape"],
                    _fmt(r["params"], "params"),
                    str(r["batch"]),
                    _fmt(r["ms"], "ms") if r["status"] == "ok" else r["status"],
                    _fmt(r["tokens_per_second"], "int"),
                    _fmt(r["mfu"], "pct"),
                    _fmt(r["memory"], "gb") + (" (est.)" if r["status"] == "oom" else ""),
                    _fmt(r["watts"], "int"),
                    _fmt(r["tokens_per_joule"], "int"),
                    f"{_fmt(r['ratio'], 'x')} {r['baseline']}" if r["baseline"] else "",
                ]
                for r in train
            ],
        )
        for key, label, file in (
            ("tokens_per_second", "tokens/s", "tokens_per_second"),
            ("mfu", "MFU", "mfu"),
            ("tokens_per_joule", "tokens per joule", "tokens_per_joule"),
            ("memory", "peak memory (bytes)", "peak_memory"),
        ):
            series: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for r in train:
                if r["status"] == "ok" and r[key] is not None:
                    series[f"{r['device']} {r['precision']} {_variant(r['name'])}"].append((r["params"], r[key]))
            figure(file, _plot(series, "parameters", label, f"{label} against parameters"))
    for doc in docs:
        if doc["benchmark"] == "sweep" and doc.get("summary"):
            best = doc["summary"]["best_per_scale"]
            note = "; ".join(
                f"{w['scale']}: {w['winner']} ({w['wide_over_deep']:.2f}x)" for w in doc["summary"]["wide_vs_deep"]
            )
            section(
                f"Best per scale — {device_of(doc)}",
                ["scale", "config", "tok/s", "MFU", "peak memory", "W", "tok/J"],
                [
                    [
                        scale,
                        b["name"],
                        _fmt(b["tokens_per_second"], "int"),
                        _fmt(b["mfu"], "pct"),
                        _fmt(b["peak_memory_bytes"], "gb"),
                        _fmt(b["avg_power_watts"], "int"),
                        _fmt(b["tokens_per_joule"], "int"),
                    ]
                    if b
                    else [scale, "nothing fitted", "", "", "", "", ""]
                    for scale, b in best.items()
                ],
                note=f"wide+shallow against deep+narrow: {note}" if note else "",
            )
    forward = _latest_entries(docs, "forward")
    if forward:
        section(
            "Forward ladder",
            ["device", "commit", "rung", "params", "ms/pass", "tok/s", "peak memory", "weights"],
            [
                [
                    device_of(d),
                    _commit(d),
                    e["config"]["name"],
                    _fmt(e["config"]["params"], "params"),
                    _fmt(e["result"]["ms_per_pass"], "ms") if e["result"]["status"] == "ok" else "out of memory",
                    _fmt(e["result"]["tokens_per_second"], "int"),
                    _fmt(e["result"]["peak_memory_bytes"], "gb"),
                    _streamed(e["result"]),
                ]
                for d, e in forward
            ],
        )
        series = defaultdict(list)
        for d, e in forward:
            if e["result"]["status"] == "ok":
                series[device_of(d)].append((e["config"]["params"], e["result"]["ms_per_pass"]))
        figure("forward_ladder", _plot(series, "parameters", "ms per forward pass", "forward ladder"))
    ceiling = _latest_entries(docs, "ceiling")
    if ceiling:
        section(
            "Training ceiling",
            [
                "device",
                "commit",
                "rung",
                "params",
                "strategy",
                "status",
                "ms/step",
                "tok/s",
                "peak memory",
                "host peak",
                "predicted device",
                "predicted host",
            ],
            [
                [
                    device_of(d),
                    _commit(d),
                    e["config"]["name"],
                    _fmt(e["config"]["params"], "params"),
                    e["strategy"],
                    e["result"]["status"],
                    _fmt(e["result"].get("ms_per_step"), "ms"),
                    _fmt(e["result"].get("tokens_per_second"), "int"),
                    _fmt(e["result"].get("peak_memory_bytes"), "gb"),
                    _fmt(e["result"].get("host_peak_bytes"), "gb"),
                    _fmt(e["predicted"]["gpu_bytes"], "gb"),
                    _fmt(e["predicted"]["host_bytes"], "gb"),
                ]
                for d, e in ceiling
            ],
            note="The newest measurement of each rung on each device.",
        )
    decode = _latest_entries(docs, "decode")
    if decode:
        section(
            "Decode",
            [
                "device",
                "commit",
                "model",
                "batch",
                "prefill tok/s",
                "decode tok/s",
                "of the bandwidth bound",
                "vs transformers generate()",
                "vs its static cache, compiled",
            ],
            [
                [
                    device_of(d),
                    _commit(d),
                    e["config"]["name"],
                    str(e["batch"]),
                    _fmt(e["result"]["prefill_tokens_per_second"], "int"),
                    _fmt(e["result"]["decode_tokens_per_second"], "int"),
                    _fmt(e["result"]["bound_fraction"], "pct"),
                    _fmt((e["result"].get("baseline") or {}).get("ratio"), "x"),
                    _fmt((e["result"].get("baseline") or {}).get("static_ratio"), "x"),
                ]
                for d, e in decode
            ],
        )
    serving = _latest_entries(docs, "serve")
    if serving:
        section(
            "Serving",
            [
                "device",
                "commit",
                "model",
                "clients",
                "tok/s",
                "vs one client",
                "TTFT p50 ms",
                "TTFT p95 ms",
                "latency p50 ms",
                "latency p95 ms",
            ],
            [
                [
                    device_of(d),
                    _commit(d),
                    e["config"]["name"],
                    str(e["batch"]),
                    _fmt(e["result"]["tokens_per_second"], "int"),
                    _fmt(e["result"].get("over_first"), "x"),
                    _fmt(e["result"]["ttft_p50_ms"], "int"),
                    _fmt(e["result"]["ttft_p95_ms"], "int"),
                    _fmt(e["result"]["latency_p50_ms"], "int"),
                    _fmt(e["result"]["latency_p95_ms"], "int"),
                ]
                for d, e in serving
            ],
        )
    dims = [d for d in docs if d["benchmark"] == "dims"]
    if dims:
        section(
            "Dimension scan",
            ["device", "dim", "hidden", "ms", "TFLOP/s", "ns/GFLOP", "spread"],
            [
                [
                    device_of(d),
                    str(p["dim"]),
                    str(p["hidden"]),
                    _fmt(p["ms"], "ms"),
                    f"{p['tflops_per_second']:.1f}",
                    f"{p['ns_per_gflop']:.3f}",
                    f"{p['spread']:.1%}",
                ]
                for d in dims
                for p in d["entries"]
            ],
        )
        cliffs = [
            [device_of(d), f"{c['from_dim']} -> {c['to_dim']}", f"x{c['ratio']:.2f}", f"x{c['threshold']:.2f}"]
            for d in dims
            for c in d.get("cliffs", [])
        ]
        section(
            "Cliffs", ["device", "dims", "time per FLOP", "noise threshold"], cliffs or [["none found", "", "", ""]]
        )
        series = defaultdict(list)
        for d in dims:
            for p in d["entries"]:
                series[device_of(d)].append((p["dim"], p["tflops_per_second"]))
        figure("dims", _plot(series, "dim", "TFLOP/s (one layer, fwd+bwd)", "dimension scan", logx=False))
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    for name, png in figures:
        (out_dir / f"{name}.png").write_bytes(png)
    md_path.write_text("\n".join(md_parts))
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}"
    html_path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>onebox report</title><style>{style}</style></head><body>{''.join(html_parts)}</body></html>"
    )
    return md_path, html_path
