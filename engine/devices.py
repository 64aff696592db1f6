"""Device and dtype are decided here and nowhere else.

CUDA, else Apple MPS, else CPU; bf16 on GPUs that support it (fp16 on older ones and MPS),
float32 on CPU. ``WORKBENCH_DEVICE`` and ``WORKBENCH_DTYPE`` override the choice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

from engine.errors import InputError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class Placement:
    """Where models live: a torch device string ("cuda", "mps", "cpu") and a dtype."""

    device: str
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def choose_device(override: str | None = None) -> str:
    """The best available device, or ``override`` / ``$WORKBENCH_DEVICE`` if set."""
    wanted = (override or os.environ.get("WORKBENCH_DEVICE") or "").strip().lower()
    if wanted:
        kind = wanted.split(":")[0]
        available = {
            "cpu": True,
            "cuda": torch.cuda.is_available(),
            "mps": torch.backends.mps.is_available(),
        }
        if kind not in available:
            raise InputError(f"Unknown device {wanted!r}: use cpu, cuda, cuda:N or mps.")
        if not available[kind]:
            raise InputError(f"Device {wanted!r} is not available on this machine: use cpu.")
        return wanted
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_dtype(device: str, override: str | None = None) -> torch.dtype:
    """float32 on CPU; bf16 where the GPU supports it, else fp16; overridable."""
    wanted = (override or os.environ.get("WORKBENCH_DTYPE") or "").strip().lower()
    if wanted and wanted != "auto":
        if wanted not in _DTYPES:
            raise InputError(f"Unknown dtype {wanted!r}: use one of {', '.join(sorted(_DTYPES))}.")
        return _DTYPES[wanted]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def choose_placement(device: str | None = None, dtype: str | None = None) -> Placement:
    """The one place that decides where models run."""
    chosen = choose_device(device)
    return Placement(device=chosen, dtype=choose_dtype(chosen, dtype))


def free_accelerator_bytes(device: str) -> int | None:
    """Free memory on a CUDA device in bytes, None elsewhere."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return None


def default_memory_budget(device: str) -> int:
    """Bytes the model manager may fill with weights: 80% of a GPU, half the RAM on CPU.

    ``WORKBENCH_MEMORY_BUDGET_GB`` overrides it.
    """
    env = os.environ.get("WORKBENCH_MEMORY_BUDGET_GB")
    if env:
        try:
            return int(float(env) * 2**30)
        except ValueError as exc:
            raise InputError(f"WORKBENCH_MEMORY_BUDGET_GB={env!r} is not a number.") from exc
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.8)
    return int(psutil.virtual_memory().total * 0.5)


@dataclass(frozen=True)
class MemorySnapshot:
    """Memory in use right now, in bytes. GPU fields are None without CUDA."""

    process_rss: int
    system_used: int
    system_total: int
    cpu_percent: float
    gpu_allocated: int | None
    gpu_reserved: int | None
    gpu_total: int | None
    gpu_name: str | None


def memory_snapshot() -> MemorySnapshot:
    """Process RSS, system RAM and (if present) CUDA memory."""
    vm = psutil.virtual_memory()
    gpu = torch.cuda.is_available()
    return MemorySnapshot(
        process_rss=psutil.Process().memory_info().rss,
        system_used=vm.total - vm.available,
        system_total=vm.total,
        cpu_percent=psutil.cpu_percent(interval=None),
        gpu_allocated=torch.cuda.memory_allocated() if gpu else None,
        gpu_reserved=torch.cuda.memory_reserved() if gpu else None,
        gpu_total=torch.cuda.get_device_properties(0).total_memory if gpu else None,
        gpu_name=torch.cuda.get_device_name(0) if gpu else None,
    )
