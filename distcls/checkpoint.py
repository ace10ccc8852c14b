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
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from distcls import dist
from distcls.errors import UserError, first_line
from distcls.atomic_files import UnreadableCheckpoint, atomic_link, atomic_write_bytes, load_weights_only

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


def check_compatible(ckpt: dict, path, cfg, spec: dict) -> None:
    """A checkpoint from another model, optimizer or data shape is refused, naming what differs."""
    saved = ckpt["config"]
    for section, key in (("model", "name"), ("optim", "name")):
        value, wanted = (saved.get(section) or {}).get(key), getattr(getattr(cfg, section), key)
        if value is not None and value != wanted:
            raise UserError(f"checkpoint {path} was trained with {section}.{key}={value}, but the config says {section}.{key}={wanted}; "
                            f"use {section}.{key}={value} to resume it, or another run.out_dir for a new run")
    saved_spec = ckpt["data_spec"]
    for key in ("channels", "num_classes", "image_size"):
        if key in saved_spec and saved_spec[key] != spec[key]:
            raise UserError(f"checkpoint {path} expects {key}={saved_spec[key]}, but this data gives {key}={spec[key]}; use the checkpoint's data settings")


def load_state(obj, state: dict, path, key: str) -> None:
    """`obj.load_state_dict(state)` (optimizer, scheduler, scaler) with an error naming the entry."""
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise UserError(f"checkpoint {path}: its '{key}' state does not fit this run ({type(exc).__name__}: "
                        f"{first_line(exc, default='')}); resume with the config it was trained with") from None


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


# What each use needs, and of which type; checked once, here, for every checkpoint distcls reads.
_INFERENCE_KEYS = {"model": dict, "config": dict, "data_spec": dict, "version": int}
_RESUME_KEYS = {**_INFERENCE_KEYS, "optimizer": dict, "scheduler": dict, "epoch": int, "step": int,
                "best_metric": (int, float), "rng": dict}
_OPTIONAL_KEYS = {"epoch_step": int, "scaler": dict, "meter": (dict, type(None)), "interval_meter": (dict, type(None)),
                  "skipped_steps": int}
_TYPE_NAMES = {dict: "a mapping", int: "an integer", (int, float): "a number"}


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def validate_checkpoint(ckpt, path, what: str = "checkpoint", resume: bool = True) -> dict:
    """The structure of a loaded checkpoint: every entry its use needs, with the right type.

    A file that fails is an `UnreadableCheckpoint` (so `--resume auto` falls back to an older one);
    a newer format version is a `UserError` (upgrade distcls).
    """
    def bad(problem: str) -> UnreadableCheckpoint:
        return UnreadableCheckpoint(f"{what} {path} is not a usable distcls checkpoint: {problem}")

    if not isinstance(ckpt, dict):
        raise bad(f"it holds a {type(ckpt).__name__}, not a dict of entries")
    needed = _RESUME_KEYS if resume else _INFERENCE_KEYS
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise bad(f"it lacks {', '.join(repr(k) for k in missing)}" + (" (needed to resume training)" if resume else ""))
    for key, types in {**needed, **{k: t for k, t in _OPTIONAL_KEYS.items() if k in ckpt}}.items():
        if not _is(ckpt[key], types):
            raise bad(f"its '{key}' is {ckpt[key]!r:.60} ({type(ckpt[key]).__name__}), not {_TYPE_NAMES.get(types, 'a valid value')}")
    if ckpt["version"] > FORMAT_VERSION:
        raise UserError(f"{what} {path} has format version {ckpt['version']}, newer than this distcls ({FORMAT_VERSION}); upgrade distcls")
    if ckpt["version"] < 1:
        raise bad(f"its format version {ckpt['version']} is not one distcls wrote")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise bad("its 'model' is not a state_dict (names -> tensors)")
    for section in ("model", "data"):
        if not isinstance(ckpt["config"].get(section), dict) or not isinstance(ckpt["config"][section].get("name"), str):
            raise bad(f"its 'config' lacks {section}.name")
    for key in ("channels", "num_classes", "image_size"):
        if not _is(ckpt["data_spec"].get(key), int) or ckpt["data_spec"][key] < 1:
            raise bad(f"its 'data_spec' lacks a positive integer '{key}'")
    if resume:
        for key in ("epoch", "step", "epoch_step"):
            if ckpt.get(key, 0) < 0:
                raise bad(f"its '{key}' is negative ({ckpt[key]})")
        if not {"python", "numpy", "torch"} <= ckpt["rng"].keys():
            raise bad("its 'rng' lacks the python/numpy/torch generator states")
        if not {"state", "param_groups"} <= ckpt["optimizer"].keys():
            raise bad("its 'optimizer' is not an optimizer state_dict (no 'state'/'param_groups')")
    return ckpt


def read_checkpoint(path, what: str = "checkpoint", resume: bool = True) -> dict:
    """Load (weights-only, integrity-checked) and validate; `resume=False`: only what inference needs."""
    return validate_checkpoint(load_weights_only(path, what), path, what, resume)


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
                found = Found(path, read_checkpoint(path))
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
        parts = [f"{', '.join(damaged)} {'is' if len(damaged) == 1 else 'are'} damaged" if damaged else "it has no last.pt or epoch_NNNN.pt"]
        if self.best.is_file():
            try:
                epoch = read_checkpoint(self.best)["epoch"]
                parts.append(f"best.pt (epoch {epoch}) is intact: pass --resume {self.best} to continue from it")
            except UnreadableCheckpoint:
                parts.append("best.pt is damaged too")
        if others:
            parts.append(f"also there: {', '.join(others)}")
        raise UserError(f"no checkpoint in {self.dir} can be resumed from: {'; '.join(parts)}; nothing was overwritten "
                        "(a fresh start would replace them: choose another run.out_dir for that)")


def resume_reason(flag: Optional[str]) -> Optional[str]:
    """Why this run resumes: --resume, a torchrun restart, or a SLURM requeue (None: fresh start)."""
    if flag:
        return f"--resume {flag}"
    for name, what in (("TORCHELASTIC_RESTART_COUNT", "torchrun restart"), ("SLURM_RESTART_COUNT", "SLURM requeue")):
        if os.environ.get(name, "").strip() and dist._int_env(name) > 0:
            return f"{what} #{os.environ[name]}"
    return None
