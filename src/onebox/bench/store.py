"""The local leaderboard: validated result documents in SQLite (the standard library's sqlite3)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from onebox.bench.schema import check_document, read_document
from onebox.errors import OneboxError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    fingerprint TEXT PRIMARY KEY,
    benchmark TEXT NOT NULL,
    device TEXT NOT NULL,
    submitter TEXT,
    created_utc TEXT NOT NULL,
    document TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    fingerprint TEXT NOT NULL REFERENCES documents(fingerprint),
    benchmark TEXT NOT NULL,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    params INTEGER,
    status TEXT,
    tokens_per_second REAL,
    mfu REAL,
    peak_memory_bytes INTEGER,
    tokens_per_joule REAL,
    ms REAL
);
"""


def device_of(doc: dict[str, Any]) -> str:
    """The label a document's results are filed under: accelerator name, or the CPU model; 'N x' before
    it when the measurement ran on N processes (bench ceiling --gpus N)."""
    hardware = doc["hardware"]
    name = hardware.get("accelerator") or f"CPU {hardware.get('cpu')}"
    processes = (doc.get("settings") or {}).get("processes") or 1
    return f"{processes} x {name}" if processes > 1 else name


def _rows(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
    rows = []
    for entry in doc["entries"]:
        if doc["benchmark"] == "dims":
            rows.append((f"dim-{entry['dim']}", None, "ok", None, None, None, None, entry["ms"]))
            continue
        result = entry["result"]
        ms = result.get("ms_per_step", result.get("ms_per_pass"))
        rows.append(
            (
                entry["config"]["name"],
                entry["config"]["params"],
                result["status"],
                result.get("tokens_per_second"),
                result.get("mfu"),
                result.get("peak_memory_bytes"),
                result.get("tokens_per_joule"),
                ms,
            )
        )
    return rows


class ResultStore:
    """Validated documents, one row each, plus one row per configuration for queries."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise OneboxError(
                f"{self.path} is not a onebox results database ({err}): give another --db path."
            ) from None

    def add(self, doc: dict[str, Any], name: str = "document") -> bool:
        """Validate and store a document; False when the same document is already stored."""
        check_document(doc, name)
        fingerprint = doc["fingerprint"]
        if self.db.execute("SELECT 1 FROM documents WHERE fingerprint = ?", (fingerprint,)).fetchone():
            return False
        device = device_of(doc)
        with self.db:
            self.db.execute(
                "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?)",
                (fingerprint, doc["benchmark"], device, doc["submitter"], doc["created_utc"], json.dumps(doc)),
            )
            self.db.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(fingerprint, doc["benchmark"], device, *row) for row in _rows(doc)],
            )
        return True

    def add_file(self, path: str | Path) -> bool:
        """Read, validate and store one JSON file."""
        return self.add(read_document(path), str(path))

    def documents(self, benchmark: str | None = None) -> list[dict[str, Any]]:
        """Stored documents, oldest first, optionally of one benchmark."""
        query = (
            "SELECT document FROM documents" + (" WHERE benchmark = ?" if benchmark else "") + " ORDER BY created_utc"
        )
        return [json.loads(row[0]) for row in self.db.execute(query, (benchmark,) if benchmark else ())]

    def leaderboard(self, benchmark: str = "sweep") -> list[tuple[Any, ...]]:
        """(device, name, params, tokens/s, MFU, peak memory, tokens/J) of the best run per device and configuration."""
        return self.db.execute(
            "SELECT device, name, params, MAX(tokens_per_second), mfu, peak_memory_bytes, tokens_per_joule FROM entries "
            "WHERE status = 'ok' AND benchmark IN (?, 'validate') GROUP BY device, name ORDER BY device, params",
            (benchmark,),
        ).fetchall()

    def close(self) -> None:
        """Close the database."""
        self.db.close()
