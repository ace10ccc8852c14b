"""The math of training and evaluation: no files, no printing.

One optimizer step = `accum_steps` micro-batches of this rank's slice of the global batch.
Gradient all-reduce is skipped (DDP `no_sync`, set before the forward) on all but the last
micro-step; the loss is divided by accum_steps so the gradient is the global-batch mean at any
world size. AMP: autocast bf16/fp16; fp16 uses a GradScaler, and gradients are unscaled before
clipping. A non-finite loss on any rank is agreed on by all ranks (skip or abort together).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from distcls import dist
from distcls.config import TrainConfig
from distcls.data import Batch, BatchLoader, Preprocess
from distcls.errors import TrainingDiverged

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Meter:
    """Sums over samples (never means of means): loss_sum, correct, count; reduced across ranks."""
    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def add(self, loss_sum: float, correct: float, count: float) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.count += count

    def reduced(self, device) -> "Meter":
        t = dist.all_reduce_sum(torch.tensor([self.loss_sum, self.correct, self.count], dtype=torch.float64, device=device))
        return Meter(*t.tolist())

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.count, 1)

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "count": self.count}


@dataclass
class EvalResult:
    loss: float
    acc: float
    count: int
    confusion: torch.Tensor  # [true, predicted] counts over ALL ranks
    top5_acc: Optional[float] = None  # true label among the 5 highest logits (None: 5 classes or fewer)

    @property
    def per_class_acc(self) -> list[float]:
        totals = self.confusion.sum(1).clamp(min=1)
        return (self.confusion.diag().double() / totals).tolist()


@dataclass
class StepContext:
    """What the step-end hook sees after optimizer step `epoch_step` (1-based within the epoch)."""
    epoch: int
    epoch_step: int
    global_step: int
    meter: Meter  # this rank's running sums for the epoch so far
    skipped_steps: int
    stop_requested: bool  # True on every rank if `stop_flag()` was True on any rank


def autocast(device: torch.device, amp_dtype):
    """Mixed-precision context for `amp_dtype` (None: full precision)."""
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()


class Trainer:
    def __init__(self, model: nn.Module, raw_model: nn.Module, optimizer, scheduler, scaler: Optional[torch.amp.GradScaler],
                 cfg: TrainConfig, preprocess: Preprocess, device: torch.device):
        self.model, self.raw_model = model, raw_model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.cfg, self.preprocess, self.device = cfg, preprocess, device
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.global_step = 0
        self.skipped_steps = 0

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _micro_batches(self, batch: Batch, epoch: int):
        x = self.preprocess(batch.images, batch.keys, epoch, train=True, memory_format=self.memory_format)
        n = self.cfg.accum_steps
        return zip(x.chunk(n), batch.labels.chunk(n))

    def train_epoch(self, loader: BatchLoader, epoch: int, start_step: int = 0, meter: Optional[Meter] = None,
                    on_step_end: Optional[Callable[[StepContext], bool]] = None,
                    stop_flag: Callable[[], bool] = lambda: False) -> Meter:
        """Train one epoch (from `start_step`); stops early when `on_step_end` returns True.

        `stop_flag` (e.g. "a signal arrived") is agreed across ranks in the same all-reduce as the
        non-finite check, so each step costs one small collective, not two.
        """
        self.model.train()
        meter = meter or Meter()
        loader.sampler.set_epoch(epoch, start_step)
        params = [p for p in self.model.parameters() if p.requires_grad]
        for i, batch in enumerate(loader):
            self.optimizer.zero_grad(set_to_none=True)
            step_loss, step_correct, step_count = 0.0, 0.0, 0
            micro = list(self._micro_batches(batch, epoch))
            for j, (x, y) in enumerate(micro):
                last = j == len(micro) - 1
                sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
                with sync:
                    with self.autocast():
                        logits = self.model(x)
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
                    scaled = loss / len(micro)
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                step_loss += loss.detach().item() * len(y)
                step_correct += (logits.detach().argmax(1) == y).sum().item()
                step_count += len(y)
            flags = torch.tensor([0.0 if math.isfinite(step_loss) else 1.0, 1.0 if stop_flag() else 0.0], device=self.device)
            nonfinite, stop = (dist.all_reduce_sum(flags) > 0).tolist()
            if nonfinite:
                if self.cfg.nonfinite == "abort":
                    raise TrainingDiverged(
                        f"non-finite loss at epoch {epoch + 1}, step {start_step + i + 1}; lower optim.lr, set "
                        "train.clip_grad_norm, use train.amp=bf16 instead of fp16, or train.nonfinite=skip")
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
            else:
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                if self.cfg.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm)
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                meter.add(step_loss, step_correct, step_count)
            self.scheduler.step()
            self.global_step += 1
            if on_step_end and on_step_end(StepContext(epoch, start_step + i + 1, self.global_step, meter, self.skipped_steps, stop)):
                break
        return meter

    def evaluate(self, loader: BatchLoader, num_classes: int) -> EvalResult:
        dist.average_buffers(self.raw_model)  # BatchNorm statistics equal on every rank before evaluating
        return evaluate(self.raw_model, loader, self.preprocess, num_classes, self.amp_dtype, self.memory_format)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, preprocess: Preprocess, num_classes: int,
             amp_dtype=None, memory_format=torch.contiguous_format) -> EvalResult:
    """Exact evaluation: every sample once at any world size; sums reduced across ranks.

    `model` is the plain module (not DDP: ranks may run different numbers of batches here).
    """
    device = loader.device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    top5 = torch.zeros(1, dtype=torch.float64, device=device)
    for batch in loader:
        x = preprocess(batch.images, batch.keys, 0, train=False, memory_format=memory_format)
        with autocast(device, amp_dtype):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").double()
        confusion += torch.bincount(batch.labels * num_classes + logits.argmax(1), minlength=num_classes ** 2).double()
        if num_classes > 5:
            top5 += (logits.topk(5, dim=1).indices == batch.labels[:, None]).any(1).sum().double()
    model.train(was_training)
    totals = dist.all_reduce_sum(torch.cat([loss_sum.view(1), top5, confusion]))
    confusion = totals[2:].view(num_classes, num_classes).round().long().cpu()
    count = int(confusion.sum())
    return EvalResult(loss=float(totals[0]) / max(count, 1), acc=float(confusion.diag().sum()) / max(count, 1),
                      count=count, confusion=confusion, top5_acc=float(totals[1]) / max(count, 1) if num_classes > 5 else None)

