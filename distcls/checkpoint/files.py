"""Checkpoint files under <out_dir>/checkpoints/, and finding the one to resume from.

  last.pt            newest state (epoch end or mid-epoch: step checkpoints, preemption)
  best.pt            best validation accuracy so far
  epoch_NNNN.pt      the last `checkpoint.keep` epoch ends
The bytes are written once (last.pt); epoch and best files of the same save are hard links to
them (a copy where links are unsupported). Later saves replace last.pt's directory entry, never
that inode, so the older names keep their content. Only rank 0 calls `write`.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from distcls.runtime.atomic_files import UnreadableCheckpoint, atomic_link, atomic_write_bytes, free_space
from distcls.checkpoint.format import all_finite, read_checkpoint
from distcls.errors import CheckpointWriteFailed, UserError

_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt$")


@dataclass
class ResumePoint:
    """A validated checkpoint (format-2 layout, see format.py; `read_checkpoint` upgrades older
    ones) and the file it came from: to resume from, or (read with resume=False) to evaluate."""
    path: Path
    checkpoint: dict

    def state(self, component: str) -> dict:
        """The saved state of one component ({} when the file has none, e.g. a scaler never saved)."""
        return self.checkpoint.get(component) or {}

    @property
    def config(self) -> dict:
        return self.checkpoint["config"]

    @property
    def data_spec(self) -> dict:
        return self.checkpoint["data_spec"]

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.checkpoint["progress"]["epoch"]

    @property
    def epoch_step(self) -> int:
        """Optimizer steps into the next epoch (0: saved at an epoch end)."""
        return self.checkpoint["progress"]["epoch_step"]

    @property
    def global_step(self) -> int:
        return self.checkpoint["progress"]["global_step"]

    @property
    def world_size(self) -> Optional[int]:
        """The world size it was saved at (None: not recorded)."""
        return self.checkpoint.get("world_size")


class CheckpointFiles:
    def __init__(self, out_dir, keep: int, warn=print):
        self.dir = Path(out_dir) / "checkpoints"
        self.keep, self.warn = keep, warn

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def has_checkpoints(self) -> bool:
        return self.dir.is_dir() and any(self.dir.glob("*.pt"))

    def write(self, state: dict, epoch_file: bool, best_file: bool) -> Optional[Path]:
        """Write last.pt (+ epoch_NNNN.pt, + best.pt as links to it); None if the weights are non-finite."""
        if not all_finite(state["model"]):
            self.warn(
                f"not saving the checkpoint of step {state['step']}: the weights hold NaN/Inf; the previous checkpoint "
                "stays"
            )
            return None
        buf = io.BytesIO()
        torch.save(state, buf)
        had_last = self.last.is_file()
        try:
            atomic_write_bytes(self.last, buf.getvalue())  # written once; the other names link to it
        except OSError as exc:
            safe = (
                f"the previous checkpoint {self.last} is intact (a save never replaces it with a partial file): resume "
                "from it with --resume auto"
                if had_last
                else "no earlier checkpoint exists: nothing of this run can be resumed"
            )
            raise self.write_failed(self.last, exc, safe) from None
        try:
            if epoch_file and self.keep:
                atomic_link(self.last, self.dir / f"epoch_{state['epoch']:04d}.pt")
                self._prune()
            if best_file:
                atomic_link(self.last, self.best)
        except OSError as exc:
            raise self.write_failed(
                Path(exc.filename or self.dir),
                exc,
                f"this save's {self.last} was written and is intact: resume from it with --resume auto",
            ) from None
        return self.last

    def write_failed(self, path: Path, exc: OSError, safe: str) -> CheckpointWriteFailed:
        """The one-line error of a save the filesystem refused (ENOSPC, EDQUOT, EIO...): file, disk, what is safe."""
        free = free_space(self.dir)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return CheckpointWriteFailed(
            f"could not save checkpoint {path}: {reason} (the disk holding {self.dir}: {free}); {safe}; "
            "free space there (or move the run elsewhere) before resuming"
        )

    def _prune(self) -> None:
        files = sorted(self.epoch_files(), reverse=True)
        for _, path in files[self.keep:]:
            path.unlink(missing_ok=True)

    def epoch_files(self) -> list:
        out = []
        for p in self.dir.glob("epoch_*.pt"):
            m = _EPOCH_FILE.search(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return out

    def find_latest(self) -> Optional[ResumePoint]:
        """The newest readable checkpoint: last.pt, else epoch files newest first (each skip warned).

        None when the directory holds no checkpoint at all. When it holds some but none can be
        resumed from, that is an error naming the damaged files: a fresh start would overwrite them.
        """
        candidates = [self.last] + [p for _, p in sorted(self.epoch_files(), reverse=True)]
        damaged = []
        for path in candidates:
            if not path.is_file():
                continue
            try:
                found = ResumePoint(path, read_checkpoint(path))
            except UnreadableCheckpoint as exc:
                damaged.append((path.name, exc))
                continue
            for _, exc in damaged:  # warned only when falling back; otherwise the error below names them
                self.warn(f"skipping unreadable checkpoint: {exc}")
            return found
        damaged = [name for name, _ in damaged]
        if not self.has_checkpoints():
            return None
        others = sorted(p.name for p in self.dir.glob("*.pt") if p.name not in damaged and p.name != self.best.name)
        parts = [
            f"{', '.join(damaged)} {'is' if len(damaged) == 1 else 'are'} damaged"
            if damaged
            else "it has no last.pt or epoch_NNNN.pt"
        ]
        if self.best.is_file():
            try:
                epoch = ResumePoint(self.best, read_checkpoint(self.best)).epoch
                parts.append(f"best.pt (epoch {epoch}) is intact: pass --resume {self.best} to continue from it")
            except UnreadableCheckpoint:
                parts.append("best.pt is damaged too")
        if others:
            parts.append(f"also there: {', '.join(others)}")
        raise UserError(f"no checkpoint in {self.dir} can be resumed from: {'; '.join(parts)}; nothing was overwritten "
                        "(a fresh start would replace them: choose another run.out_dir for that)")


