"""The math of training and evaluation: no files, no printing.

One optimizer step = `accum_steps` micro-batches of this rank's slice of the global batch.
Gradient all-reduce is skipped (DDP `no_sync`, set before the forward) on all but the last
micro-step; the loss is divided by accum_steps so the gradient is the global-batch mean at any
world size. Mixed precision, clipping and the guarded update are `Precision`'s (precision.py).

A step never makes the host wait for the device. Its communication is DDP's gradient all-reduce
and ONE all-reduce of two flags (this rank's loss is non-finite; this rank got a stop signal),
both queued like any kernel. The update is skipped on the device when the agreed flag (or the
all-reduced gradients' norm) is non-finite. The host reads the agreed flags later: on CUDA one
step late, after the next step is queued (`flag_lag=1`), at the epoch's last step at once; on the
CPU at once (there is nothing to overlap). The running loss/accuracy sums stay on the device.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from distcls import dist
from distcls.config import TrainConfig
from distcls.data import Batch, BatchLoader, Preprocess
from distcls.engine.loss import TrainingLoss
from distcls.engine.precision import Precision, autocast
from distcls.engine.progress import Progress
from distcls.errors import TrainingDiverged


@dataclass(frozen=True)
class StepEnd:
    """Yielded by `Trainer.train_epoch` after each optimizer step (already in `progress`) is queued."""
    stop_requested: bool  # a stop signal on some rank, agreed by every rank at the same step


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


class Trainer:
    """`model` is what runs the forward (DDP and/or compiled); `module` is the plain nn.Module
    that owns the weights (evaluated, saved, loaded)."""

    def __init__(self, model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 precision: Precision, cfg: TrainConfig, preprocess: Preprocess, device: torch.device,
                 flag_lag: Optional[int] = None):
        self.model, self.module = model, module
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.cfg, self.preprocess, self.device = cfg, preprocess, device
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.flag_lag = (1 if device.type == "cuda" else 0) if flag_lag is None else flag_lag
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss = TrainingLoss(cfg.label_smoothing)  # hard labels, or Mixup/CutMix soft targets
        self._unread: list[HostCopy] = []  # agreed flags of steps queued but not yet read on the host

    def train_epoch(self, loader: BatchLoader, progress: Progress, stop_signal: Callable[[], bool] = lambda: False
                    ) -> Iterator[StepEnd]:
        """Train epoch `progress.epoch` from `progress.epoch_step` to its end, one yield per step.

        Collective (every rank): each step all-reduces gradients and flags. The caller may stop
        iterating when `stop_requested` (all ranks see it at the same step). With
        `train.nonfinite=abort`, a non-finite step raises TrainingDiverged (its update was skipped).
        """
        self.model.train()
        loader.sampler.set_epoch(progress.epoch, progress.epoch_step)
        last_step = loader.sampler.steps_per_epoch
        unread = self._unread = []
        for batch in loader:
            flags = self._step(batch, progress, stop_signal)
            progress.epoch_step += 1
            progress.global_step += 1
            unread.append(HostCopy(flags, progress.epoch_step))
            # The flags the host may read now: all but the newest `flag_lag` steps' (whose work may
            # still run), and at the epoch's last step all of them (the epoch's end is agreed).
            readable = len(unread) if progress.epoch_step >= last_step else max(0, len(unread) - self.flag_lag)
            stop = False
            for read in unread[:readable]:
                stop = self._agreed_stop(read, progress) or stop
            del unread[:readable]
            yield StepEnd(stop_requested=stop)
            if stop:
                return
        for flags in unread:  # a loader shorter than the sampler's count: still agree on every step
            self._agreed_stop(flags, progress)

    def _step(self, batch: Batch, progress: Progress, stop_signal: Callable[[], bool]) -> torch.Tensor:
        """Queue one optimizer step; returns the agreed [skipped, stop] flags (device)."""
        self.optimizer.zero_grad(set_to_none=True)
        x, targets = self.preprocess.train_batch(batch.images, batch.labels, batch.keys, progress.epoch, self.memory_format)
        micro = list(zip(x.chunk(self.cfg.accum_steps), targets.chunk(self.cfg.accum_steps)))
        loss_sum = correct = 0  # become device tensors at the first micro-batch
        for j, (xs, ys) in enumerate(micro):
            sync = contextlib.nullcontext() if j == len(micro) - 1 or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self.precision.autocast():
                    logits = self.model(xs)
                    loss = self.loss(logits.float(), ys)
                self.precision.backward(loss / len(micro) if len(micro) > 1 else loss)
            loss_sum = loss_sum + loss.detach().double() * len(ys)
            correct = correct + self.loss.correct(logits.detach(), ys)
        count = loss_sum.new_full((), float(len(batch.labels)))
        # One all-reduce agrees on both flags (the signal checked as late as possible); no host read here.
        flags = dist.all_reduce_sum(torch.stack([(~torch.isfinite(loss_sum)).double(), count.new_full((), float(stop_signal()))]))
        skipped = self.precision.step(self.optimizer, self.params, self.cfg.clip_grad_norm, skip=flags[0] > 0)
        progress.epoch_sums.add_(torch.stack([loss_sum, correct.double(), count]), keep=~skipped)
        progress.skipped += skipped
        self.scheduler.step()
        return torch.stack([skipped.double(), flags[1]])

    def check_diverged(self, progress: Progress) -> None:
        """With `train.nonfinite=abort`: raise TrainingDiverged if a step whose flags the host has
        not read yet was non-finite. Waits for those steps: for the moments that wait anyway (a
        checkpoint save), so that an aborting run never saves the state after its diverged step,
        which a resume would continue from as if the step had been skipped. Local: the flags are
        already agreed, every rank raises at the same call."""
        if self.cfg.nonfinite == "abort":
            for flags in self._unread:
                self._agreed_stop(flags, progress)

    def _agreed_stop(self, flags: HostCopy, progress: Progress) -> bool:
        skipped, stop = flags.values()
        if skipped and self.cfg.nonfinite == "abort":
            raise TrainingDiverged(
                f"non-finite loss at epoch {progress.epoch + 1}, step {flags.step} (a NaN/Inf loss on some rank, or, "
                "without fp16, in the gradients); lower optim.lr, set "
                "train.clip_grad_norm, use train.amp=bf16 instead of fp16, or train.nonfinite=skip")
        return stop > 0


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, preprocess: Preprocess, num_classes: int,
             amp_dtype=None, memory_format=torch.contiguous_format) -> EvalResult:
    """Exact evaluation: every sample once at any world size. Collective (every rank): the sums
    are all-reduced at the end.

    `model` is the plain module (not DDP: ranks may run different numbers of batches here). Its
    BatchNorm statistics must already be equal on every rank (the run averages them at epoch end).
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
        cells = batch.labels * num_classes + logits.argmax(1)
        confusion.scatter_add_(0, cells, torch.ones_like(cells, dtype=confusion.dtype))  # bincount would sync on CUDA
        if num_classes > 5:
            top5 += (logits.topk(5, dim=1).indices == batch.labels[:, None]).any(1).sum().double()
    model.train(was_training)
    totals = dist.all_reduce_sum(torch.cat([loss_sum.view(1), top5, confusion]))
    confusion = totals[2:].view(num_classes, num_classes).round().long().cpu()
    count = int(confusion.sum())
    return EvalResult(loss=float(totals[0]) / max(count, 1), acc=float(confusion.diag().sum()) / max(count, 1),
                      count=count, confusion=confusion, top5_acc=float(totals[1]) / max(count, 1) if num_classes > 5 else None)
