"""Small file helpers shared by the modules that read and write JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from onebox.errors import OneboxError


def read_json(path: str | Path, what: str, missing_hint: str = "") -> Any:
    """Parse a JSON file, turning a missing or malformed file into OneboxError naming `what` it is."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OneboxError(f"{what} {path} does not exist{': ' + missing_hint if missing_hint else ''}.") from None
    except json.JSONDecodeError as err:
        raise OneboxError(f"{what} {path} is not valid JSON ({err}).") from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text to a temp file beside path, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
