"""Compare training runs' loss curves: `python benchmarks/loss_compare.py REFERENCE_RUN RUN...`.

Reads each run folder's metrics.jsonl and prints, per logged step, each run's train loss and its
relative difference from the reference's, then the final validation losses; exits non-zero when
a run's last train or validation loss differs from the reference's by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run: Path) -> tuple[dict[int, float], float | None]:
    train, val = {}, None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            train[entry["step"]] = entry["loss"]
        if "val_loss" in entry:
            val = entry["val_loss"]
    return train, val


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative, on the last losses (default 1%%)")
    args = parser.parse_args()
    curves = [read_metrics(run) for run in args.runs]
    reference, ref_val = curves[0]
    print("step  " + "  ".join(f"{run.name:>22s}" for run in args.runs))
    for step in sorted(reference):
        cells = [f"{reference[step]:22.4f}"]
        for train, _ in curves[1:]:
            value = train.get(step)
            cells.append(
                f"{'n/a':>22s}"
                if value is None
                else f"{value:12.4f} ({(value - reference[step]) / reference[step]:+6.2%})"
            )
        print(f"{step:4d}  " + "  ".join(cells))
    last = max(reference)
    failed = False
    for run, (train, val) in zip(args.runs[1:], curves[1:]):
        train_diff = (train[last] - reference[last]) / reference[last]
        val_diff = None if val is None or ref_val is None else (val - ref_val) / ref_val
        ok = abs(train_diff) <= args.tolerance and (val_diff is None or abs(val_diff) <= args.tolerance)
        failed |= not ok
        print(
            f"{run.name}: last train loss {train_diff:+.2%}, val loss {'n/a' if val_diff is None else f'{val_diff:+.2%}'} "
            f"against {args.runs[0].name}: {'within' if ok else 'OUTSIDE'} {args.tolerance:.0%}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
