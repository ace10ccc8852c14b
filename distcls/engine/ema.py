"""Model EMA: an exponential moving average of the weights, on the device, without host reads.

Built on torch's own `torch.optim.swa_utils.AveragedModel` (its copy of the module and its
`n_averaged` buffer) and `get_ema_multi_avg_fn` (one `torch._foreach_lerp_` over every floating
tensor), like torchvision's references (`ExponentialMovingAverage`, `use_buffers=True`: BatchNorm
running statistics are averaged too). Two differences from `AveragedModel.update_parameters`, both
for the step's speed and none for the numbers:
- the update count lives on the host as well (`updates`), so choosing "copy" (the first update)
  or "average" never reads `n_averaged` back from the device (torch's `bool(n_averaged == 0)` is
  a device-to-host sync on a GPU);
- the tensor lists are grouped once, at construction, not at every update.
Integer buffers (BatchNorm's `num_batches_tracked`) are copied from the model, not averaged.

The EMA must be built from the module that trains (after SyncBatchNorm conversion and the move to
the device, before compile/DDP wrapping: those keep the same parameter tensors), and it is kept
on EVERY rank: the parameters are equal on all ranks under DDP, so every rank's EMA is equal, and
a resume restores it on every rank from the checkpoint. The BatchNorm statistics differ between
ranks (they are not synced during the epoch), so the run averages the EMA's buffers at each epoch
end together with the model's (`dist.average_buffers`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def adjusted_decay(decay: float, global_batch: int, every_steps: int, epochs: int) -> float:
    """torchvision's references' decay adjustment (`--model-ema-decay` with `--model-ema-steps`):
    alpha = (1 - decay) * global batch * every_steps / epochs, capped at 1; decay = 1 - alpha.
    It keeps the EMA's horizon in epochs roughly fixed when the batch or the update interval changes."""
    alpha = min(1.0, (1.0 - decay) * global_batch * every_steps / epochs)
    return 1.0 - alpha


@dataclass(frozen=True)
class EMASchedule:
    """When the EMA updates (global step counted from 1), and which updates copy the weights instead
    of averaging them (torchvision resets `n_averaged` after each update during the lr warmup).

    cadence "run": every `every_steps`-th optimizer step of the run; the updates in the first
    `warmup_steps` steps copy. cadence "epoch" (torchvision's `i % model_ema_steps == 0` over each
    epoch's steps i = 0, 1, ...): the steps 0, every_steps, ... of each epoch of `steps_per_epoch`;
    the updates in the warmup copy, and so does the first one after it (n_averaged was reset)."""
    every_steps: int
    warmup_steps: int
    cadence: str = "run"
    steps_per_epoch: int = 1

    def due(self, global_step: int) -> bool:
        if self.cadence == "epoch":
            return (global_step - 1) % self.steps_per_epoch % self.every_steps == 0
        return global_step % self.every_steps == 0

    def copies(self, global_step: int) -> bool:
        if self.cadence == "epoch" and self.warmup_steps:  # the warmup's updates and the first one after it
            first_after = next(
                g for g in range(self.warmup_steps + 1, self.warmup_steps + self.steps_per_epoch + 1) if self.due(g)
            )
            return global_step <= first_after
        return global_step <= self.warmup_steps


class EMAHook:
    """The model EMA as a step hook of the trainer: after each optimizer step that its schedule
    makes due, the EMA updates from the trained module (queued like the step: no host read)."""

    def __init__(self, ema: "ModelEMA", schedule: EMASchedule):
        self.ema, self.schedule = ema, schedule

    def after_step(self, module: torch.nn.Module, global_step: int) -> None:
        if self.schedule.due(global_step):
            self.ema.update(module, copy=self.schedule.copies(global_step))


class ModelEMA(AveragedModel):
    """`ModelEMA(module, decay)`: `update(module)` after an optimizer step; `.module` is the
    averaged model (evaluate it); `state_dict()`/`load_state_dict()` are a checkpoint component."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        super().__init__(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay
        self.module.requires_grad_(False)
        self.updates = 0  # host mirror of n_averaged
        self._pairs = None  # (ema floats, model floats, ema ints, model ints), built on the first update

    def _tensor_lists(self, module: torch.nn.Module):
        if self._pairs is None or self._pairs[-1] is not module:
            ema = [*self.module.parameters(), *self.module.buffers()]
            live = [*module.parameters(), *module.buffers()]
            if len(ema) != len(live) or any(a.shape != b.shape for a, b in zip(ema, live)):
                raise ValueError(
                    "the EMA's module and the trained module differ in structure; build the EMA from the module that "
                    "trains"
                )
            floats = [(a, b.detach()) for a, b in zip(ema, live) if a.is_floating_point()]
            ints = [(a, b.detach()) for a, b in zip(ema, live) if not a.is_floating_point()]
            self._pairs = (
                [a for a, _ in floats],
                [b for _, b in floats],
                [a for a, _ in ints],
                [b for _, b in ints],
                module,
            )
        return self._pairs[:4]

    @torch.no_grad()
    def update(self, module: torch.nn.Module, copy: bool = False) -> None:
        """One EMA update from `module` (the plain module, not its DDP/compile wrapper); `copy`
        (or the first update) copies the weights instead. Queued on the device: no host read."""
        ema_floats, model_floats, ema_ints, model_ints = self._tensor_lists(module)
        if copy or self.updates == 0:
            torch._foreach_copy_(ema_floats, model_floats)
        else:
            self.multi_avg_fn(ema_floats, model_floats, None)
        if ema_ints:
            torch._foreach_copy_(ema_ints, model_ints)
        self.n_averaged.add_(1)
        self.updates += 1

    def update_parameters(self, model: torch.nn.Module) -> None:  # torch's name for the same thing
        self.update(model)

    def state_dict(self, *args, **kwargs):
        """{'weights': the averaged module's plain state_dict, 'updates': count}: what inference loads."""
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        if not state:
            raise ValueError("the checkpoint holds no EMA weights (it was trained with train.ema.enabled=false); "
                             "resume it with train.ema.enabled=false, or start a new run from its weights")
        self.module.load_state_dict(state["weights"], strict=strict)
        self.updates = int(state["updates"])
        self.n_averaged.fill_(self.updates)
        return None
