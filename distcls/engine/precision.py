"""Mixed precision in one object: the autocast dtype, fp16 loss scaling, and the optimizer step.

    precision.backward(loss)                              # scaled for fp16
    precision.step(optimizer, params, clip, skip)         # unscale -> clip -> step -> update

`step` never reads a device value on the host. Whether the update is applied is decided on the
device: `skip` (a 0-d tensor every rank agreed on) or, without fp16 scaling, a non-finite
gradient norm (the gradients are already all-reduced, so every rank sees the same norm) turns
the update into a no-op inside the optimizer's fused kernel (`found_inf`, the same mechanism
torch's GradScaler uses). fp16's own overflow check stays the scaler's business: it skips the
update and lowers the scale, as in torch's AMP recipe, without counting as a skipped step.
Optimizers without a fused implementation fall back to one host read of the flag per step.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Mixed-precision context for `dtype` (None: full precision)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer takes `found_inf` and skips its update on the device (torch's fused kernels)."""
    return getattr(optimizer, "_step_supports_amp_scaling", False) and all(
        g.get("fused") for g in optimizer.param_groups
    )


class Precision:
    def __init__(self, amp: str, device: torch.device):
        self.amp, self.dtype, self.device = amp, DTYPES[amp], device
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def autocast(self):
        return autocast(self.device, self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list, clip_grad_norm: Optional[float],
             skip: torch.Tensor) -> torch.Tensor:
        """Apply the update unless `skip` (or a non-finite gradient without fp16 scaling).

        Returns a bool 0-d tensor on the device: True when the update was skipped for a
        non-finite loss or gradient (fp16 scale overflows are not counted: the scaler handles them).
        """
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # gradients unscaled before clipping; overflow -> the scaler's found_inf
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if clip_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad_norm, norm)
        skipped = skip | ~torch.isfinite(norm)  # unscaled gradients: an fp16 overflow shows here too
        self._guarded_step(optimizer, skipped.float())
        if self.scaler is not None:
            self.scaler.update()  # lowers the scale after an overflow (its own check in unscale_), else may grow it
            return skip
        return skipped

    @staticmethod
    def _guarded_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
        if supports_device_skip(optimizer):
            # the GradScaler protocol of torch's fused optimizers
            optimizer.grad_scale, optimizer.found_inf = None, found_inf
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        elif not bool(found_inf.item()):  # host read: only for optimizers without a fused kernel
            optimizer.step()

    def state_dict(self) -> dict:
        """The fp16 loss scale and its growth tracker ({} for bf16 / full precision)."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
