"""Live progress for long work: a rich bar on a terminal, plain lines in logs and CI."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


def format_eta(seconds: float | None) -> str:
    """Seconds as h:mm:ss, n/a for None."""
    if seconds is None:
        return "n/a"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plural(count: int, noun: str) -> str:
    """'1 document', '2 documents'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


class ProgressDisplay:
    """Shows step, loss, lr, tokens/s, MFU, memory and ETA; a live bar on terminals, lines elsewhere."""

    def __init__(
        self, total_steps: int, first_step: int = 0, console: Console | None = None, enabled: bool = True
    ) -> None:
        self.console = console or Console(stderr=False)
        self.enabled = enabled
        self.total = total_steps
        self.first = first_step
        self.started = time.perf_counter()
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=first_step, info="")
            self._progress.start()

    def eta_seconds(self, step: int) -> float | None:
        """Remaining time from the average pace since this display started."""
        done = step - self.first
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def update(self, step: int, info: str) -> None:
        """Report progress after `step` steps with a one-line summary of the metrics."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        else:
            self.console.print(
                f"step {step}/{self.total} | {info} | ETA {format_eta(self.eta_seconds(step))}", highlight=False
            )

    def message(self, text: str) -> None:
        """Print a line above the live bar (or in sequence with the log lines)."""
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        """Stop the live bar."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
