"""Start a job under torchrun, one process per GPU: `onebox train --gpus N` (the same command in each
process) and the benchmarks' workers (`python -m onebox.bench.workers`, given their job explicitly).

torchrun (PyTorch's launcher) starts the processes, gives each its RANK / LOCAL_RANK / WORLD_SIZE,
and stops every process when one fails; this wrapper only builds its command line, keeps NVLink
multicast off (the machines this project runs on share their GPUs: see the README), and turns a
failure into one message naming the rank that failed first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from onebox.errors import OneboxError

# NVLink multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM (the device machines require it).
SAFE_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def torchrun_command(processes: int, argv: list[str], module: str = "onebox.cli") -> list[str]:
    """The torchrun command line that runs `python -m <module> <argv>` without --gpus on `processes` local processes."""
    if processes < 1:
        raise OneboxError(f"--gpus must be at least 1, got {processes}.")
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--gpus":
            skip = True
        elif not item.startswith("--gpus="):
            rest.append(item)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        module,
        *rest,
    ]


def launch(processes: int, argv: list[str], module: str = "onebox.cli", device: str | None = None) -> int:
    """Run `python -m <module> <argv>` under torchrun on `device` (None: the --device in argv); 0 on success,
    else 1 after saying which rank failed first."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OneboxError(
            "--gpus starts torchrun itself, and this process is already one of a torchrun job: "
            "leave --gpus out under torchrun (it gives the processes), or run onebox without torchrun."
        )
    if device is None:
        device = next((b for a, b in zip(argv, argv[1:]) if a == "--device"), None)
        device = next((a.split("=", 1)[1] for a in argv if a.startswith("--device=")), device)
    cpu = device == "cpu"
    if not cpu and torch.cuda.device_count() < processes:
        raise OneboxError(
            f"--gpus {processes} asks for more GPUs than this machine has ({torch.cuda.device_count()}); "
            f"use --gpus {max(1, torch.cuda.device_count())}, or --device cpu for CPU processes."
        )
    env = {**os.environ, **SAFE_ENVIRONMENT}
    done = subprocess.run(torchrun_command(processes, argv, module), env=env, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode == 0:
        return 0
    sys.stderr.write(
        f"error: the {processes}-process job stopped: {failure_summary(done.stderr, done.returncode)}; every rank was stopped. "
        f"Its own error is printed above.\n"
    )
    return 1


def run_job(processes: int, module: str, job: str, spec: dict[str, Any], folder: Path) -> tuple[int, Path]:
    """Run `python -m <module> <job> SPEC OUT` on `processes` processes, SPEC being `spec` written as JSON
    into `folder` (its "device" says where they run): the job is given explicitly, not through the environment. Returns the exit code and
    OUT, where the job's rank 0 writes its result."""
    spec_path, out = folder / f"{job}-spec.json", folder / f"{job}.json"
    spec_path.write_text(json.dumps(spec))
    return launch(processes, [job, str(spec_path), str(out)], module, spec.get("device")), out


def failure_summary(stderr: str, returncode: int) -> str:
    """Which rank failed first, from torchrun's report ("Root Cause (first observed failure)")."""
    root = stderr.split("Root Cause", 1)[-1]
    first = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", root, re.S)
    return (
        f"rank {first.group(1)} failed first (exit code {first.group(2)})"
        if first
        else f"torchrun exited with {returncode}"
    )
