"""Checkpoints: what is saved, where, and how a run finds the one to resume from.

Rank 0 writes, every rank waits at a barrier afterwards. Files under <out_dir>/checkpoints/:
  last.pt            newest state (epoch end or mid-epoch: step checkpoints, preemption)
  best.pt            best validation accuracy so far
  epoch_NNNN.pt      the last `checkpoint.keep` epoch ends
The bytes are written once (last.pt); epoch and best files of the same save are hard links to
them (a copy where links are unsupported). Later saves replace last.pt's directory entry, never
that inode, so the older names keep their content.
Every file is a plain dict of tensors and Python data, loadable with
`torch.load(path, weights_only=True)`; nothing is ever loaded any other way.
"""
from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from distcls import dist
from distcls.errors import UserError
from distcls.io import UnreadableCheckpoint, atomic_link, atomic_write_bytes, load_weights_only

FORMAT_VERSION = 1
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt$")


# ------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------- validation


def all_finite(state_dict: dict) -> bool:
    return all(torch.isfinite(v).all().item() for v in state_dict.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def check_compatible(ckpt: dict, path, model_name: str, spec: dict) -> None:
    """A checkpoint from another model or data shape is refused, naming what differs."""
    saved_name = ckpt.get("config", {}).get("model", {}).get("name")
    if saved_name is not None and saved_name != model_name:
        raise UserError(f"checkpoint {path} was trained with model.name={saved_name}, but the config says model.name={model_name}; use the same model or another run.out_dir")
    saved_spec = ckpt.get("data_spec") or {}
    for key in ("channels", "num_classes", "image_size"):
        if key in saved_spec and saved_spec[key] != spec[key]:
            raise UserError(f"checkpoint {path} expects {key}={saved_spec[key]}, but this data gives {key}={spec[key]}; use the checkpoint's data settings")


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensors differ in shape (e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} model tensors are missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} are unknown to the model (e.g. {unexpected[0]})")
        raise UserError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def read_checkpoint(path, what: str = "checkpoint") -> dict:
    ckpt = load_weights_only(path, what)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "version" not in ckpt:
        raise UnreadableCheckpoint(f"{what} {path} is not a distcls checkpoint (no 'model'/'version' entries)")
    if ckpt["version"] > FORMAT_VERSION:
        raise UserError(f"{what} {path} has format version {ckpt['version']}, newer than this distcls ({FORMAT_VERSION}); upgrade distcls")
    return ckpt


# ------------------------------------------------------------------------- saving & finding


@dataclass
class Found:
    path: Path
    checkpoint: dict


class CheckpointStore:
    """Rank 0 writes atomically; all ranks wait at a barrier so nobody races into a collective."""

    def __init__(self, out_dir, keep: int, is_main: bool, warn=print):
        self.dir = Path(out_dir) / "checkpoints"
        self.keep, self.is_main, self.warn = keep, is_main, warn

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def has_checkpoints(self) -> bool:
        return self.dir.is_dir() and any(self.dir.glob("*.pt"))

    def save(self, state: dict, epoch_file: bool, is_best: bool) -> Optional[Path]:
        """Write last.pt (+ epoch file, + best.pt). Non-finite weights are never written."""
        written = None
        if self.is_main:
            if not all_finite(state["model"]):
                self.warn(f"not saving the checkpoint of step {state['step']}: the weights hold NaN/Inf; the previous checkpoint stays")
            else:
                buf = io.BytesIO()
                torch.save(state, buf)
                data = buf.getvalue()
                atomic_write_bytes(self.last, data)  # written once; the other names link to it
                written = self.last
                if epoch_file and self.keep:
                    atomic_link(self.last, self.dir / f"epoch_{state['epoch']:04d}.pt")
                    self._prune()
                if is_best:
                    atomic_link(self.last, self.best)
        dist.barrier()
        return written

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

    def find_latest(self) -> Optional[Found]:
        """The newest readable checkpoint: last.pt, else epoch files newest first (each skip warned)."""
        candidates = [self.last] + [p for _, p in sorted(self.epoch_files(), reverse=True)]
        for path in candidates:
            if not path.is_file():
                continue
            try:
                return Found(path, read_checkpoint(path))
            except UnreadableCheckpoint as exc:
                self.warn(f"skipping unreadable checkpoint: {exc}")
        return None


def resume_reason(flag: Optional[str], env: dict) -> Optional[str]:
    """Why this run resumes: --resume, a torchrun restart, or a SLURM requeue (None: fresh start)."""
    if flag:
        return f"--resume {flag}"
    if int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return f"torchrun restart #{env['TORCHELASTIC_RESTART_COUNT']}"
    if int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        return f"SLURM requeue #{env['SLURM_RESTART_COUNT']}"
    return None
