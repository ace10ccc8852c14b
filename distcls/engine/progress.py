"""Where the run is: epoch, step, best metric, skipped steps and the running sums.

`Progress` is one of the stateful components the checkpointer saves (see checkpoint/checkpointer.py).
Its running sums (loss, correct, count over samples; never means of means) stay on the training
device while the epoch runs: adding a step costs no host read. They are agreed across ranks only
by `agree_sums`, a collective that the log-if-due record and the checkpointer call on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from distcls.runtime import dist


@dataclass(frozen=True)
class Totals:
    """Host values of running sums, already summed over ranks."""
    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    @property
    def loss(self) -> float:
        """NaN when no sample counted (every step skipped): recorded as null, never as a loss of 0."""
        return self.loss_sum / self.count if self.count else float("nan")

    @property
    def acc(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    def minus(self, other: "Totals") -> "Totals":
        return Totals(self.loss_sum - other.loss_sum, self.correct - other.correct, self.count - other.count)

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "count": self.count}


class RunningSums:
    """[loss_sum, correct, count] of this rank as one float64 tensor on the device."""

    def __init__(self, device: torch.device, start: Optional[Totals] = None):
        if start is None:
            self.values = torch.zeros(3, dtype=torch.float64, device=device)  # a fill: no host-to-device copy
        else:
            self.values = torch.tensor([start.loss_sum, start.correct, start.count], dtype=torch.float64, device=device)

    def add_(self, step_sums: torch.Tensor, keep: torch.Tensor) -> None:
        """Add one step's [loss_sum, correct, count] where `keep` (a device bool) is True."""
        self.values.add_(torch.where(keep, step_sums, 0.0))

    def agree(self) -> Totals:
        """Collective (every rank): the sums over all ranks, read to the host."""
        summed = dist.all_reduce_sum(self.values.clone())
        return Totals(*summed.tolist())


@dataclass
class Progress:
    """epoch: epochs completed; epoch_step: optimizer steps into the current epoch (the exact sample
    position); global_step; best_metric (-1: none yet); skipped_steps (non-finite, agreed by all ranks).
    A checkpoint component (state_dict / load_state_dict, saved under "progress")."""
    device: torch.device
    is_main: bool = True
    steps_per_epoch: Optional[int] = None  # the train loader's; None: unknown (a Progress outside a run)
    epoch: int = 0
    epoch_step: int = 0
    global_step: int = 0
    best_metric: float = -1.0
    wandb_id: Optional[str] = None
    epoch_sums: RunningSums = field(init=False)
    skipped: torch.Tensor = field(init=False)  # device counter: read only when agreed (never per step)
    epoch_totals: Totals = field(init=False)  # the last agreed value of epoch_sums
    logged_totals: Totals = field(init=False)  # epoch_totals at the last log.every_steps record

    def __post_init__(self):
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.start_epoch_sums()

    def start_epoch_sums(self, epoch_totals: Optional[Totals] = None, logged_totals: Optional[Totals] = None) -> None:
        """Fresh sums for an epoch; after a mid-epoch resume rank 0 carries every rank's sums so far."""
        self.epoch_sums = RunningSums(self.device, epoch_totals)
        self.epoch_totals = epoch_totals or Totals()
        self.logged_totals = logged_totals or self.epoch_totals

    def agree_sums(self) -> Totals:
        """Collective (every rank): update `epoch_totals` from every rank's running sums."""
        self.epoch_totals = self.epoch_sums.agree()
        return self.epoch_totals

    @property
    def mid_epoch(self) -> bool:
        """Inside an epoch: some of its steps done, not all (after the last one the epoch's end is
        due: its records, evaluation and `finish_epoch`)."""
        return 0 < self.epoch_step and (self.steps_per_epoch is None or self.epoch_step < self.steps_per_epoch)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far: identical on every rank, read from the device (a host sync)."""
        return int(self.skipped.item())

    def finish_epoch(self) -> None:
        """The epoch is done (its records and checkpoint read the sums before): the next starts at 0."""
        self.epoch, self.epoch_step = self.epoch + 1, 0
        self.start_epoch_sums()

    # ------------------------------------------------------------- checkpoint component

    def state_dict(self) -> dict:
        """Host data only; call `agree_sums` first (on every rank) for a mid-epoch save."""
        mid_epoch = self.mid_epoch
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "global_step": self.global_step,
                "best_metric": self.best_metric, "skipped_steps": self.skipped_steps, "wandb_id": self.wandb_id,
                "epoch_totals": self.epoch_totals.state_dict() if mid_epoch else None,
                "logged_totals": self.logged_totals.state_dict() if mid_epoch else None}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.epoch_step = state["epoch"], state["epoch_step"]
        self.global_step, self.best_metric = state["global_step"], state["best_metric"]
        self.skipped.fill_(state["skipped_steps"])
        self.wandb_id = state["wandb_id"]
        epoch_totals = logged_totals = None
        if self.epoch_step and self.is_main and state["epoch_totals"]:  # the others start at 0: sums stay exact
            epoch_totals = Totals(**state["epoch_totals"])
            logged_totals = Totals(**state["logged_totals"]) if state["logged_totals"] else None
        self.start_epoch_sums(epoch_totals, logged_totals)
        # saved at an epoch's last step, before its evaluation
        if self.steps_per_epoch is not None and self.epoch_step >= self.steps_per_epoch:
            self.finish_epoch()
