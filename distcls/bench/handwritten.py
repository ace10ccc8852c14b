"""The reference loops distcls is measured against: what a user writes by hand, nothing more.

The same model, optimizer settings, AMP, clipping, label smoothing and augmentation as a distcls
config, but no engine: a plain `zero_grad / forward / backward / clip / step`, no per-step
`.item()`, augmentation as batched tensor ops with the device's own RNG (airbench style), and no
learning-rate schedule (its per-step cost is a Python multiply). Used by `compare` (in memory, and
behind the tutorial DataLoader pipeline) and by `scaling` (under DDP, see `ddp_loop.py`).
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

OPTIMIZERS = {
    "sgd": lambda params, o: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                             nesterov=o.nesterov and o.momentum > 0),
    "adam": lambda params, o: torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay),
    "adamw": lambda params, o: torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay),
}
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock reading means what it says."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def augment(x: torch.Tensor, crop_padding: int, hflip: bool, rotation_deg: float) -> torch.Tensor:
    """Random crop after zero padding, horizontal flip, rotation: batched, on x's device."""
    b, _, h, w = x.shape
    dev = x.device
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), device=dev)
        ox = torch.randint(0, 2 * p + 1, (b,), device=dev)
        rows = oy[:, None] + torch.arange(h, device=dev)
        cols = ox[:, None] + torch.arange(w, device=dev)
        x = padded.permute(0, 2, 3, 1)[
            torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]
        ].permute(0, 3, 1, 2)
    if hflip:
        x = torch.where(torch.rand(b, 1, 1, 1, device=dev) < 0.5, x.flip(-1), x)
    if rotation_deg > 0:
        theta = (torch.rand(b, device=dev, dtype=x.dtype) * 2 - 1) * (rotation_deg * math.pi / 180)
        cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
        mat = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
        x = F.grid_sample(x, F.affine_grid(mat, list(x.shape), align_corners=False), align_corners=False)
    return x


class HandLoop:
    """One optimizer step at a time on `model` (already on `device`, maybe DDP-wrapped)."""

    def __init__(self, model: torch.nn.Module, cfg, device: torch.device, mean, std):
        self.model, self.cfg, self.device = model, cfg, device
        self.optimizer = OPTIMIZERS[cfg.optim.name]([p for p in model.parameters() if p.requires_grad], cfg.optim)
        self.amp_dtype = AMP_DTYPES[cfg.train.amp]
        self.scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.loss_sum = torch.zeros((), device=device)  # kept on the device: no per-step sync

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 batch on the device -> augmented, normalized float batch."""
        aug = self.cfg.data.augment
        x = augment(images_uint8.float().div_(255), aug.crop_padding, aug.hflip, aug.rotation_deg)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with amp:
            loss = F.cross_entropy(self.model(x).float(), y, label_smoothing=self.cfg.train.label_smoothing)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.train.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.loss_sum += loss.detach()


def timed_steps(batches, step, warmup: int, steps: int, device: torch.device) -> float:
    """Images/s over `steps` calls of step(x, y) after `warmup` (>= 1) untimed ones.

    `batches` yields (x, y). The clock starts when the last warm-up step has finished and covers
    fetching each timed batch and its step (as an epoch would), nothing after the last one.
    """
    t0, images = None, 0
    for i, (x, y) in enumerate(batches):
        if i >= warmup:
            images += len(y)
        step(x, y)
        if i == warmup - 1:
            sync(device)
            t0 = time.perf_counter()
        if i == warmup + steps - 1:
            break
    sync(device)
    if t0 is None or not images:
        raise RuntimeError(f"the batches ran out before {warmup} warm-up and {steps} timed steps")
    return images / (time.perf_counter() - t0)
