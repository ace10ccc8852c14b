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

    for step in trainer.train_epoch(loader, progress, stop):   # one yield per optimizer step
        ...                                                     # stop.agreed: every rank stops here
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from distcls.runtime import dist
from distcls.config import TrainConfig
from distcls.runtime.copies import HostCopy
from distcls.data import Batch, BatchLoader, Preprocess
from distcls.engine.loss import TrainingLoss
from distcls.engine.precision import Precision, autocast
from distcls.engine.progress import Progress
from distcls.errors import TrainingDiverged
from distcls.runtime.signals import StopRequest


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
                 flag_lag: Optional[int] = None, hooks: Sequence = ()):
        self.model, self.module = model, module
        # Per-step features (the model EMA: ema.EMAHook): `after_step(module, global_step)` after each optimizer step
        self.hooks = list(hooks)
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.cfg, self.preprocess, self.device = cfg, preprocess, device
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.flag_lag = (1 if device.type == "cuda" else 0) if flag_lag is None else flag_lag
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss = TrainingLoss(cfg.label_smoothing)  # hard labels, or Mixup/CutMix soft targets
        self._unread_flags: list[HostCopy] = []  # agreed flags of steps queued but not yet read on the host
        # the float32 input batch lent to preprocess (CPU only, _input_buffer)
        self._buffer: Optional[torch.Tensor] = None

    def train_epoch(self, loader: BatchLoader, progress: Progress, stop: Optional[StopRequest] = None) -> Iterator[int]:
        """Train epoch `progress.epoch` from `progress.epoch_step` to its end, one yield per step.

        Collective (every rank): each step all-reduces gradients and flags. When the flags say a
        rank got a stop signal, `stop.agreed` is set and the epoch ends after that step's yield
        (every rank at the same step). With `train.nonfinite=abort`, a non-finite step raises
        TrainingDiverged (its update was skipped).
        """
        stop = stop if stop is not None else StopRequest()
        self.model.train()
        loader.sampler.set_epoch(progress.epoch, progress.epoch_step)
        unread = self._unread_flags = []
        for batch in loader:
            flags = self._step(batch, progress, stop)  # queued: the host does not wait for the step
            progress.epoch_step += 1
            progress.global_step += 1
            for hook in self.hooks:  # queued after the step's update like the step itself (no host read)
                hook.after_step(self.module, progress.global_step)
            unread.append(HostCopy(flags, progress.epoch_step))
            # The flags the host may read now: all but the newest `flag_lag` steps' (whose work may
            # still run), and at the epoch's last step all of them (the epoch's end is agreed).
            readable = max(0, len(unread) - self.flag_lag) if progress.mid_epoch else len(unread)
            for landed in unread[:readable]:
                stop.agreed = self._read_flags(landed, progress) or stop.agreed
            del unread[:readable]
            yield progress.global_step  # the step just queued; a stop is `stop.agreed` (the one channel)
            if stop.agreed:
                return
        for flags in unread:  # a loader shorter than the sampler's count: still agree on every step
            self._read_flags(flags, progress)

    def _step(self, batch: Batch, progress: Progress, stop: StopRequest) -> torch.Tensor:
        """Collective: queue one optimizer step (DDP's gradient all-reduce, one all-reduce of the
        flags); returns the agreed [skipped, stop] flags (device). Reads nothing from the device."""
        self.optimizer.zero_grad(set_to_none=True)
        x, targets = self.preprocess.train_batch(
            batch.images,
            batch.labels,
            batch.keys,
            progress.epoch,
            self.memory_format,
            out=self._input_buffer(batch.images),
        )
        micro = list(zip(x.chunk(self.cfg.accum_steps), targets.chunk(self.cfg.accum_steps)))
        loss_sum = correct = 0  # become device tensors at the first micro-batch
        for j, (xs, ys) in enumerate(micro):
            # Gradients are all-reduced at the last micro-batch's backward only (DDP's no_sync before).
            sync = (
                contextlib.nullcontext()
                if j == len(micro) - 1 or not hasattr(self.model, "no_sync")
                else self.model.no_sync()
            )
            with sync:
                with self.precision.autocast():
                    logits = self.model(xs)
                    loss = self.loss(logits.float(), ys)
                self.precision.backward(loss / len(micro) if len(micro) > 1 else loss)
            loss_sum = loss_sum + loss.detach().double() * len(ys)
            correct = correct + self.loss.correct(logits.detach(), ys)
        count = loss_sum.new_full((), float(len(batch.labels)))
        # One all-reduce agrees on both flags (the signal checked as late as possible); no host read here.
        flags = dist.all_reduce_sum(
            torch.stack([(~torch.isfinite(loss_sum)).double(), count.new_full((), float(stop.requested))])
        )
        skipped = self.precision.step(self.optimizer, self.params, self.cfg.clip_grad_norm, skip=flags[0] > 0)
        progress.epoch_sums.add_(torch.stack([loss_sum, correct.double(), count]), keep=~skipped)
        progress.skipped += skipped
        self.scheduler.step()
        return torch.stack([skipped.double(), flags[1]])

    def _input_buffer(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """On the CPU, the float32 tensor each step's batch is written into, reused while the batch
        shape stays (a shorter last batch makes a new one): the previous step (forward, backward,
        update) has finished with it when the next step's batch is made (a CPU runs them in order).
        Elsewhere None: the caching allocator makes allocation cheap and the device may still be
        reading the previous batch."""
        if images.device.type != "cpu":
            return None
        if self._buffer is None or self._buffer.shape != images.shape:
            self._buffer = torch.empty(images.shape, dtype=torch.float32)
        return self._buffer

    def check_diverged(self, progress: Progress) -> None:
        """With `train.nonfinite=abort`: raise TrainingDiverged if a step whose flags the host has
        not read yet was non-finite. Waits for those steps: for the moments that wait anyway (a
        checkpoint save), so that an aborting run never saves the state after its diverged step,
        which a resume would continue from as if the step had been skipped. Local: the flags are
        already agreed, every rank raises at the same call."""
        if self.cfg.nonfinite == "abort":
            for flags in self._unread_flags:
                self._read_flags(flags, progress)

    def _read_flags(self, flags: HostCopy, progress: Progress) -> bool:
        """A step's agreed flags, read on the host: raises TrainingDiverged for a non-finite step
        under train.nonfinite=abort; True when some rank got a stop signal."""
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
    return EvalResult(
        loss=float(totals[0]) / max(count, 1),
        acc=float(confusion.diag().sum()) / max(count, 1),
        count=count,
        confusion=confusion,
        top5_acc=float(totals[1]) / max(count, 1) if num_classes > 5 else None,
    )
