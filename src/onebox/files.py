"""File helpers shared by everything that writes: JSON, atomic text, and output folders that never
delete what the user already has (built in a temp folder beside the target, then moved into place)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OneboxError(f"{what} {path} is not valid JSON ({err}).") from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text to a temp file beside path, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_disk_full(err: BaseException) -> bool:
    """Whether an error (or any error in its chain of causes) is 'no space left on device'."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current)
        if "No space left on device" in text or "errno 28" in text.lower() or "error code: 28" in text.lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def staging_folder(target: Path) -> Path:
    """A new empty folder beside `target` (same filesystem, so moving out of it is a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def publish_folder(staging: Path, target: Path, replace: Iterable[str] = ()) -> Path:
    """Move a finished staging folder's files to `target` with the user's umask; return target.

    A missing or empty target becomes the staging folder (one rename). Into a folder that holds files,
    each new file is renamed into place; an existing file may be replaced only when it is named in
    `replace` (the earlier output's own files), and those of them the new output lacks are removed.
    Nothing else in the target is touched; a clash with any other file is refused before anything moves.
    """
    mask = current_umask()
    names = sorted(p.name for p in staging.iterdir())
    for name in names:
        (staging / name).chmod(0o666 & ~mask)
    staging.chmod(0o777 & ~mask)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(staging, target)
        return target
    own = set(replace)
    clashes = [name for name in names if (target / name).exists() and name not in own]
    if clashes:
        shutil.rmtree(staging, ignore_errors=True)
        raise OneboxError(
            f"{target} already holds {', '.join(clashes[:3])}, which onebox did not write there: choose an empty or new folder."
        )
    for name in names:
        os.replace(staging / name, target / name)
    for name in own - set(names):
        old = target / name
        if old.is_file() and not old.is_symlink():
            old.unlink()
    staging.rmdir()
    return target


def check_output_folder(target: Path, flag: str = "the output folder") -> None:
    """Refuse a target that exists and is not a folder (e.g. a file of that name)."""
    if target.exists() and not target.is_dir():
        raise OneboxError(f"{flag} {target} is an existing file, not a folder: give a new folder's path.")
