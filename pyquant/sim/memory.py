"""Memory QuantSim needs for its copy of a model, checked before the copy is made.

A simulation built on a copy holds the model twice; for a large language model that may not fit. The check
runs before anything is allocated, so that the user gets an error naming the bytes and the way out
(`QuantSim(..., in_place=True)`) instead of the operating system's out-of-memory killer."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["model_bytes", "available_bytes", "check_copy_fits"]


def model_bytes(model: nn.Module) -> dict[torch.device, int]:
    """Bytes of `model`'s parameters and buffers by device, each storage counted once (tied weights, views)."""
    seen: set[tuple[torch.device, int]] = set()
    out: dict[torch.device, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        key = (t.device, st.data_ptr())
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        out[t.device] = out.get(t.device, 0) + st.nbytes()
    return out


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory that can still be allocated on `device`: MemAvailable of /proc/meminfo for the CPU, the free
    memory the driver reports for a CUDA device; None where it is not known (other systems, devices)."""
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def check_copy_fits(model: nn.Module) -> None:
    """MemoryError when a copy of `model` does not fit in the memory available on one of its devices,
    before anything is allocated; the message gives the bytes needed and available and names `in_place`."""
    for device, need in model_bytes(model).items():
        have = available_bytes(device)
        if have is not None and need > have:
            raise MemoryError(
                f"QuantSim: copying the model needs {need} bytes ({need / 2**30:.2f} GiB) on {device}, but only "
                f"{have} bytes ({have / 2**30:.2f} GiB) are available; build the simulation on the model itself "
                f"with QuantSim(..., in_place=True), which shares the model's parameters instead of copying them")
