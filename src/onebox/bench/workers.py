"""The processes of a multi-GPU benchmark: `python -m onebox.bench.workers JOB SPEC OUT` under torchrun.

`bench validate --gpus N` and `bench ceiling --gpus N` write what each process must do (the model's
config, the settings, the strategy) to SPEC, a JSON file, and start this module through
`launch.run_job`; every process joins the group, runs the job, and rank 0 writes the result to OUT.
Nothing is passed through the environment or re-parsed from the command line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from onebox.bench.ceiling import climb_sharded
from onebox.bench.training import BenchSettings, measure_training
from onebox.config import model_config_from_dict
from onebox.device import pick_device
from onebox.distributed import init_distributed, shutdown
from onebox.errors import OneboxError
from onebox.plan import strategy

JOBS = ("validate", "ceiling")


def _validate(spec: dict[str, Any], out: Path) -> None:
    ranks, device = init_distributed(spec["device"])
    try:
        config = model_config_from_dict(spec["model"])
        result = measure_training("onebox", config, pick_device(device), BenchSettings(**spec["settings"]), ranks=ranks)
        if ranks.main:
            out.write_text(json.dumps(result))
    finally:
        shutdown(ranks)


def _ceiling(spec: dict[str, Any], out: Path) -> None:
    climb_sharded(
        model_config_from_dict(spec["model"]),
        strategy(spec["strategy"]),
        spec["device"],
        spec["batch"],
        spec["steps"],
        spec["lr"],
        str(out),
        spec["gpu_limit"],
    )


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in JOBS:
        sys.stderr.write(f"usage: python -m onebox.bench.workers {{{','.join(JOBS)}}} SPEC.json OUT.json\n")
        return 2
    job, spec, out = argv[0], json.loads(Path(argv[1]).read_text()), Path(argv[2])
    try:
        (_validate if job == "validate" else _ceiling)(spec, out)
    except OneboxError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
