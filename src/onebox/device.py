"""Device facts: backend choice, the one peak-FLOPs table, memory caps and readings, NVML power and energy, hardware facts."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from typing import Any

import torch

from onebox.errors import OneboxError

# Peak dense (no sparsity) bf16 tensor-core rates in FLOP/s from the vendors' datasheets.
# Matched in order against the lower-cased device name; the first match wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989e12),
    ("gh200", 989e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM
    ("h800", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("a10g", 70e12),
    ("a10", 125e12),
    ("rtx 4090", 165e12),
    ("rtx 3090", 71e12),
)


def pick_device(requested: str = "auto") -> torch.device:
    """Resolve 'auto' to cuda, then mps, then cpu; check that an explicit choice exists."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise OneboxError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OneboxError("device cuda was asked for but this torch sees no CUDA GPU: use --device cpu or auto.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OneboxError("device mps was asked for but is not available here: use --device cpu or auto.")
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for matmuls (None = plain fp32): bf16 on CUDA by default, fp32 elsewhere.

    fp8 runs what is not an FP8 product under bf16 autocast.
    """
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp8"):
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """An autocast context for the device, or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def device_name(device: torch.device) -> str:
    """Human name of the accelerator, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU ({cpu_model()})"
    return cpu_model()


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of the device from PEAK_BF16_FLOPS, or None when unknown (CPU, MPS)."""
    if device.type != "cuda":
        return None
    name = device_name(device).lower()
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def cap_gpu_memory(device: torch.device, limit_bytes: int | None) -> None:
    """Let this process's allocator take at most `limit_bytes` of the GPU (a smaller card on a larger
    one, e.g. 80 GB on a 141 GB H200). Memory outside the caching allocator (the CUDA context, NCCL's
    buffers) is not counted, as it is not on the smaller card either. No-op off CUDA or without a limit."""
    if limit_bytes is None or device.type != "cuda":
        return
    device = indexed(device)  # the allocator's cap is per GPU: a bare "cuda" means the current one
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), device)


def indexed(device: torch.device) -> torch.device:
    """A CUDA device with its index (the current GPU for a bare "cuda"); other devices as they are."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window where the backend allows it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Measured peak: allocated device memory on CUDA, driver memory on MPS, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def host_memory_bytes() -> int | None:
    """Installed host RAM, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo where there is one, else platform's answer."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class EnergyMeter:
    """Energy and average power of one GPU over a window, from NVML's total-energy counter.

    Readings are None (printed n/a) where NVML or the counter is missing: CPU, MPS, old GPUs.
    """

    def __init__(self, device: torch.device) -> None:
        self._handle: Any = None
        self._start_mj: int | None = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception:  # no NVML library, no permission or no energy counter: report n/a
            self._handle = None

    def _read_mj(self) -> int | None:
        if self._handle is None:
            return None
        import pynvml

        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def start(self) -> None:
        """Open the window."""
        self._start_mj = self._read_mj()

    def joules(self) -> float | None:
        """Energy in joules since start(), or None."""
        now = self._read_mj()
        if now is None or self._start_mj is None:
            return None
        return (now - self._start_mj) / 1000.0


def memory_kind(device: torch.device) -> str:
    """What peak_memory_bytes measures on this device."""
    return {"cuda": "cuda allocated", "mps": "mps driver"}.get(device.type, "process peak RSS")


def format_bytes(count: float | None) -> str:
    """Bytes as GB with one decimal (or MB when small); n/a for None."""
    if count is None:
        return "n/a"
    if count >= 1e9:
        return f"{count / 1e9:.1f} GB"
    return f"{count / 1e6:.0f} MB"


def _nvml_facts(device: torch.device) -> dict[str, Any]:
    """Driver version and power limit from NVML, None where NVML is missing."""
    facts: dict[str, Any] = {"driver": None, "power_limit_watts": None}
    if device.type != "cuda":
        return facts
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        driver = pynvml.nvmlSystemGetDriverVersion()
        facts["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        facts["power_limit_watts"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
    except Exception:  # NVML absent or refused: the facts stay None (shown as n/a)
        pass
    return facts


def hardware_facts(device: torch.device) -> dict[str, Any]:
    """What a result document records about the machine it was measured on."""
    facts: dict[str, Any] = {
        "device_type": device.type,
        "accelerator": device_name(device) if device.type != "cpu" else None,
        "accelerator_memory_bytes": None,
        "accelerator_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "cuda_version": torch.version.cuda,
        "torch_version": torch.__version__,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "host_memory_bytes": host_memory_bytes(),
        "os": platform.platform(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "peak_bf16_flops": peak_flops(device),
    }
    if device.type == "cuda":
        facts["accelerator_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    facts.update(_nvml_facts(device))
    return facts


def quiet_optional_imports() -> None:
    """Silence the start-up warnings of optional libraries that transformers and float8 training import
    (torchao's missing optional kernels, torch's note on an enum torchao registers): noise for the user."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
