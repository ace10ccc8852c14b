"""Copies between the host and the training device that never make the host wait.

    host_to_device(t, device)   # host -> device: pinned and non-blocking on CUDA
    HostCopy(t).values()        # device -> host: waits only for the work queued before the copy

The training step reads nothing from the device; what the host needs (the agreed per-step flags,
the progress bar's running sums) comes back through a `HostCopy`, read when it has landed.
"""
from __future__ import annotations

import torch


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without making the host wait (pinned, non-blocking for CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class HostCopy:
    """The values of a small device tensor, copied to the host without waiting for the device.

    `values()` waits only for the work queued before the copy (on CUDA, through an event), so
    reading the previous step's copy after queueing the next step costs no stall.
    """

    def __init__(self, tensor: torch.Tensor, step: int = 0):
        self.step = step
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = tensor, None

    def ready(self) -> bool:
        """The copy has landed: `values()` will not wait."""
        return self._ready is None or self._ready.query()

    def values(self) -> list:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()
