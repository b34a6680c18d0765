"""Peak memory of this process: peak resident set size on CPU, peak allocated memory on CUDA.

On Linux the CPU peak is `VmHWM` from `/proc/self/status`, which `reset_peak_memory` clears
(by writing 5 to `/proc/self/clear_refs`), so a trainer can measure one phase (e.g. training
after a reference model was used and freed). Elsewhere it falls back to `ru_maxrss`, which
cannot be reset.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    """A `/proc/self/status` field given in kB, in MiB; None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory since the start or the last `reset_peak_memory`, in MiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_memory_mb(device: torch.device | str = "cpu") -> float:
    """Resident memory now (CPU) or allocated CUDA memory now, in MiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    rss = _status_mb("VmRSS")
    return float("nan") if rss is None else rss


def reset_peak_memory(device: torch.device | str = "cpu") -> bool:
    """Start a new peak-memory window; False where the platform cannot (then the peak stays
    the process's lifetime peak)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False
