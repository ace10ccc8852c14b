"""The checkpointer: one owner for what a checkpoint holds, when one is written, and how a run
is restored from one.

    checkpointer = Checkpointer(files, components, progress, policy, metadata, is_main)
    checkpointer.load(resume_point)                 # every component, the mirror image of save
    checkpointer.maybe_save(SaveReason.STEP)        # after every step: the policy decides

`components` maps a checkpoint key (a component of format.ENTRIES) to an object with
`state_dict()` / `load_state_dict(state)`: model weights, optimizer, scheduler, precision, RNG.
`progress` is one more, saved under "progress" (and its epoch/step copied to the file's top level
for readers, format.PROGRESS_SUMMARY); the checkpointer also asks it where the run is.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch

from distcls.runtime import dist
from distcls.checkpoint.files import CheckpointFiles, ResumePoint
from distcls.checkpoint.format import COMPONENTS, FORMAT_VERSION, check_compatible, model_mismatch, progress_summary
from distcls.errors import CheckpointWriteFailed, UserError, first_line

if TYPE_CHECKING:
    from distcls.engine.progress import Progress


class SaveReason(enum.Enum):
    STEP = "step"  # after an optimizer step, mid-epoch
    EPOCH_END = "epoch_end"  # after the epoch's evaluation (progress.epoch counts it)
    STOP = "stop"  # a stop signal: always saved, at the step boundary where every rank stopped


class SaveFiles(NamedTuple):
    """The names a save writes besides last.pt."""
    epoch_file: bool  # epoch_NNNN.pt
    best_file: bool  # best.pt


@dataclass(frozen=True)
class SavePolicy:
    every_steps: int  # 0: no mid-epoch saves
    every_epochs: int  # 0: no epoch_NNNN.pt files
    epochs: int
    has_val: bool  # best.pt follows validation accuracy; without validation it is the final weights

    def decide(self, progress: "Progress", reason: SaveReason, new_best: bool = False) -> Optional[SaveFiles]:
        """The files to write when this moment calls for a save, else None."""
        # mid-epoch: last.pt every `every_steps` (an epoch's last step is its end's to save)
        if reason is SaveReason.STEP:
            due = progress.mid_epoch and self.every_steps > 0 and progress.global_step % self.every_steps == 0
            return SaveFiles(False, False) if due else None
        if progress.mid_epoch:  # a stop inside an epoch: last.pt
            return SaveFiles(False, False)
        final = progress.epoch == self.epochs
        periodic = bool(self.every_epochs) and progress.epoch % self.every_epochs == 0
        epoch_file = bool(self.every_epochs) and (periodic or final)
        best_file = new_best or (not self.has_val and final)
        # its step was the epoch's last
        step_due = self.every_steps > 0 and progress.global_step % self.every_steps == 0
        if final or periodic or best_file or step_due or reason is SaveReason.STOP:
            return SaveFiles(epoch_file, best_file)
        return None


class StateMismatch(ValueError):
    """A saved state that does not fit the component being restored."""


class ModuleWeights:
    """An nn.Module's weights as a component; a mismatch names the tensors that differ."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        problem = model_mismatch(self.module, state)
        if problem:
            raise StateMismatch(problem)
        self.module.load_state_dict(state)


class OptimizerState:
    """An optimizer as a component. Hyperparameters and buffers come from the checkpoint; how the
    step runs (fused/foreach kernels) stays as this run built it."""
    IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        built = [{k: g[k] for k in self.IMPLEMENTATION if k in g} for g in self.optimizer.param_groups]
        # torch places each saved tensor by the SAVED groups' flags: a `step` saved without fused
        # kernels would stay a CPU tensor, which CUDA's fused Adam/AdamW refuse ("Expected all
        # tensors to be on the same device ... state_steps"). Give it this run's flags first.
        groups = [{**saved, **flags} for saved, flags in zip(state["param_groups"], built)] + state["param_groups"][
            len(built) :
        ]
        self.optimizer.load_state_dict({**state, "param_groups": groups})
        for group, flags in zip(self.optimizer.param_groups, built):
            group.update(flags)


def load_components(point: ResumePoint, components: dict) -> None:
    """Restore each component from its saved state; a state that does not fit is a UserError naming it.
    The one route from a checkpoint into live objects (resume and inference)."""
    for key, component in components.items():
        try:
            component.load_state_dict(point.state(key))
        except StateMismatch as exc:
            raise UserError(f"checkpoint {point.path} does not fit the {key}: {exc}") from None
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise UserError(f"checkpoint {point.path}: its '{key}' state does not fit this run ({type(exc).__name__}: "
                            f"{first_line(exc, default='')}); resume with the config it was trained with") from None


class Checkpointer:
    def __init__(self, files: CheckpointFiles, components: dict, progress: "Progress", policy: SavePolicy,
                 metadata: dict, is_main: bool, before_save: Callable[["Progress"], None] = lambda progress: None):
        self.files, self.progress, self.policy = files, progress, policy
        self.components = {**components, "progress": progress}
        unknown = set(self.components) - set(COMPONENTS)
        assert not unknown, f"not components of the checkpoint format (format.ENTRIES): {sorted(unknown)}"
        # config, data_spec, world_size, train_samples, provenance
        self.metadata = {**metadata, "version": FORMAT_VERSION}
        self.is_main = is_main
        # called with the progress; may raise to refuse the save (Trainer.check_diverged)
        self.before_save = before_save

    def state_dict(self) -> dict:
        """The checkpoint's content (local: no communication). Tensors and plain data only."""
        state = {key: component.state_dict() for key, component in self.components.items()}
        return {**state, **progress_summary(state["progress"]), **self.metadata}

    def load(self, point: ResumePoint) -> None:
        """Restore every component, progress included, from a validated checkpoint (every rank reads it)."""
        check_compatible(point.config, point.data_spec, point.path, self.metadata["config"], self.metadata["data_spec"])
        load_components(point, self.components)

    def maybe_save(self, reason: SaveReason, new_best: bool = False) -> Optional[Path]:
        """Collective (every rank, same arguments): save if the policy says this moment needs it."""
        files = self.policy.decide(self.progress, reason, new_best)
        return self.save(*files) if files is not None else None

    def save(self, epoch_file: bool = False, best_file: bool = False) -> Optional[Path]:
        """Collective (every rank): agree the running sums (mid-epoch), rank 0 writes, all wait for it.
        Returns last.pt, or None if nothing was written (rank != 0, or non-finite weights). A write the
        filesystem refused raises CheckpointWriteFailed on every rank (rank 0's names the file)."""
        self.before_save(self.progress)
        if self.progress.mid_epoch:
            self.progress.agree_sums()  # rank 0 saves every rank's sums so far
        written, failure = None, None
        if self.is_main:
            try:
                written = self.files.write(self.state_dict(), epoch_file, best_file)
            except CheckpointWriteFailed as exc:
                failure = exc
        # The wait for rank 0 is also how every rank learns that its write failed: all stop together.
        if dist.any_rank(failure is not None, self.progress.device):
            try:
                raise failure or CheckpointWriteFailed(
                    "rank 0 could not save the checkpoint (its error line names the file and the disk)"
                )
            finally:
                # The exception's traceback holds this frame: kept in `failure`, the two made a cycle that kept the
                # run (its DDP model, so the process group) alive past destroy_process_group, until the interpreter's
                # shutdown, where gloo's threads aborted the process at times (SIGABRT instead of exit 5).
                failure = None
        return written
