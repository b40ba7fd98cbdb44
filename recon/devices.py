"""Which torch device a job runs on: ``auto`` (the GPU when this process sees one, else the
CPU) or an explicit ``cpu`` / ``cuda`` / ``cuda:N``."""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: configs name a device without it
    import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """``name`` (None = ``auto``) -> a device. Asking for CUDA where there is none is an
    error that says so, not a crash at the first tensor."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"device {name!r}: this process sees {count} CUDA device(s)")
    return device


def default_cpu_threads() -> int:
    """``OMP_NUM_THREADS`` when it is set to a count (what Ray gives each task and actor, or
    a job scheduler or the user chose), else the cores this process may run on (its CPU
    affinity, which containers and job schedulers narrow)."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0))


def set_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op CPU threads: ``threads``, else :func:`default_cpu_threads`.
    Returns the number."""
    import torch

    n = threads or default_cpu_threads()
    torch.set_num_threads(n)
    return n


@contextmanager
def cpu_threads_within(threads: int | None = None) -> Iterator[int]:
    """:func:`set_cpu_threads` for the ``with`` block only (yields the number); the count
    before it is put back after, also when the block raises. Results that depend on the
    order of float sums are reproducible for a given count."""
    import torch

    before = torch.get_num_threads()
    try:
        yield set_cpu_threads(threads)
    finally:
        torch.set_num_threads(before)


__all__ = ["DEVICE_PATTERN", "cpu_threads_within", "default_cpu_threads", "pick_device",
           "set_cpu_threads"]
