"""What this machine can lend: device kind, name and memory (CUDA through torch when present, else CPU)."""

from __future__ import annotations

import dataclasses
import os
import platform


@dataclasses.dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    device_name: str
    memory_bytes: int


def detect(preferred: str = "auto") -> Hardware:
    """The device the node would train on. `preferred` is the config's `device` (auto/cpu/cuda)."""
    if preferred in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(index)
            return Hardware("cuda", props.name[:128], int(props.total_memory))
    return Hardware("cpu", (platform.processor() or platform.machine() or "cpu")[:128], _system_memory())


def _system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
