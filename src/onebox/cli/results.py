"""`onebox results` (the local leaderboard) and `onebox report`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from onebox.cli.common import console, errors
from onebox.errors import OneboxError


def cmd_results_add(args: argparse.Namespace) -> int:
    from onebox.bench.store import ResultStore

    store = ResultStore(args.db)
    failed = 0
    for path in args.files:
        try:
            added = store.add_file(path)
            console.print(f"{'added' if added else 'already stored'}: {path}", highlight=False)
        except OneboxError as err:
            errors.print(f"[bold red]rejected:[/bold red] {err}", highlight=False)
            failed += 1
    store.close()
    return 1 if failed else 0


def cmd_results_list(args: argparse.Namespace) -> int:
    from onebox.bench.store import ResultStore
    from onebox.device import format_bytes

    if not Path(args.db).is_file():
        raise OneboxError(f"no leaderboard at {args.db} yet: add result documents with `onebox results add FILE.json`.")
    store = ResultStore(args.db)
    table = Table("device", "config", "params", "tok/s", "MFU", "peak memory", "tok/J")
    for device, name, params, tps, mfu, memory, tpj in store.leaderboard():
        table.add_row(
            device,
            name,
            f"{params / 1e6:,.0f}M",
            f"{tps:,.0f}",
            "n/a" if mfu is None else f"{mfu:.1%}",
            format_bytes(memory),
            "n/a" if tpj is None else f"{tpj:,.0f}",
        )
    console.print(table)
    store.close()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from onebox.bench.report import build_report
    from onebox.bench.schema import check_document, read_document
    from onebox.bench.store import ResultStore

    if args.files:
        docs = [read_document(path) for path in args.files]
        for path, doc in zip(args.files, docs):
            check_document(doc, path)
    elif Path(args.db).is_file():  # (an absent store is not created just to find it empty)
        store = ResultStore(args.db)
        docs = store.documents()
        store.close()
    else:
        docs = []
    if not docs:
        raise OneboxError("no result documents to report: give JSON files or add some with `onebox results add`.")
    md, page = build_report(docs, args.out)
    console.print(f"wrote {md} and {page}", highlight=False)
    return 0


def add_results_parsers(sub: Any) -> None:
    results = sub.add_parser("results", help="the local leaderboard").add_subparsers(dest="results", required=True)
    p = results.add_parser("add", help="validate result documents and store them")
    p.add_argument("files", nargs="+")
    p.add_argument("--db", default="results/leaderboard.sqlite")
    p.set_defaults(func=cmd_results_add)
    p = results.add_parser("list", help="best stored run per device and configuration")
    p.add_argument("--db", default="results/leaderboard.sqlite")
    p.set_defaults(func=cmd_results_list)

    p = sub.add_parser("report", help="Markdown + self-contained HTML report with plots")
    p.add_argument("files", nargs="*", help="result documents (default: everything in --db)")
    p.add_argument("--db", default="results/leaderboard.sqlite")
    p.add_argument("--out", default="results/report")
    p.set_defaults(func=cmd_report)
