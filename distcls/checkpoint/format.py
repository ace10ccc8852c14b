"""The checkpoint format: what a file holds (ENTRIES, the one table that saving, loading,
validation and inference derive from), how it is checked, and the pieces saved with it.

A checkpoint is a plain dict of tensors and Python data, loadable with
`torch.load(path, weights_only=True)`; nothing is ever loaded any other way. Format 2:
- components, each the `state_dict()` of one stateful object of the run, restored by its
  `load_state_dict` (checkpointer.py): model (the plain module's state_dict, no `module.`/
  `_orig_mod.` prefix), optimizer, scheduler, scaler (Precision: the fp16 loss scale; {}
  otherwise), rng (GlobalRNG), progress (Progress: epoch, epoch_step, global_step, best_metric,
  skipped_steps, wandb_id, and mid-epoch the running sums epoch_totals, logged_totals);
- the run: config, data_spec, world_size, version;
- where the run is, for readers of the file (copies of progress's, never restored from):
  epoch, epoch_step, step (= progress.global_step), best_metric.
Format 1 (every checkpoint written before format 2) had no `progress`: its fields lay at the top
level, some under other names (step, meter, interval_meter). `read_checkpoint` upgrades a
format-1 file to the format-2 layout, so nothing else knows format 1.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from distcls.runtime import dist
from distcls.runtime.atomic_files import UnreadableCheckpoint, load_weights_only
from distcls.errors import UserError

FORMAT_VERSION = 2

# ------------------------------------------------------------------------- RNG state


class GlobalRNG:
    """The process's python, numpy, torch and CUDA generators as one stateful component.

    All distcls randomness is keyed (seed, epoch, sample); these matter for plug-in models that
    draw from the global generators (dropout, ...). Rank 0's state is saved and restored on all ranks.
    """

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


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
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------- validation


def all_finite(state_dict: dict) -> bool:
    return all(
        torch.isfinite(v).all().item()
        for v in state_dict.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


def check_compatible(saved_config: dict, saved_spec: dict, path, config: dict, spec: dict) -> None:
    """A checkpoint from another model, optimizer or data shape is refused, naming what differs.

    `config`/`spec`: this run's, as plain dicts (Config.to_dict(), DataSpec.to_dict())."""
    for section, key in (("model", "name"), ("optim", "name")):
        value, wanted = (saved_config.get(section) or {}).get(key), config[section][key]
        if value is not None and value != wanted:
            raise UserError(
                f"checkpoint {path} was trained with {section}.{key}={value}, but the config says "
                f"{section}.{key}={wanted}; "
                f"use {section}.{key}={value} to resume it, or another run.out_dir for a new run"
            )
    for key in ("channels", "num_classes", "image_size"):
        if key in saved_spec and saved_spec[key] != spec[key]:
            raise UserError(
                f"checkpoint {path} expects {key}={saved_spec[key]}, but this data gives {key}={spec[key]}; use the "
                "checkpoint's data settings"
            )


def model_mismatch(model: torch.nn.Module, state: dict) -> Optional[str]:
    """What keeps `state` from loading into `model` exactly (None: it fits)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} tensors differ in shape (e.g. {k}: checkpoint {tuple(state[k].shape)} vs model "
            f"{tuple(own[k].shape)})"
        )
    if missing:
        parts.append(f"{len(missing)} model tensors are missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} are unknown to the model (e.g. {unexpected[0]})")
    return "; ".join(parts) or None


# ------------------------------------------------------------------------- the table

# who needs an entry: evaluate/predict (and training), training, nobody
INFERENCE, RESUME, OPTIONAL = "inference", "resume", "optional"


@dataclass(frozen=True)
class Entry:
    """One top-level entry of a checkpoint."""
    key: str
    types: Union[type, tuple]
    needed_by: str  # INFERENCE, RESUME or OPTIONAL
    component: bool = False  # the state_dict() of a stateful object, restored by its load_state_dict()
    # what is wrong with a value of the right type (None: nothing)
    check: Optional[Callable[[Any], Optional[str]]] = None


def _state_dict(value: dict) -> Optional[str]:
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        return "is not a state_dict (names -> tensors)"
    return None


def _optimizer(value: dict) -> Optional[str]:
    return (
        None
        if {"state", "param_groups"} <= value.keys()
        else "is not an optimizer state_dict (no 'state'/'param_groups')"
    )


def _rng(value: dict) -> Optional[str]:
    return None if {"python", "numpy", "torch"} <= value.keys() else "lacks the python/numpy/torch generator states"


_PROGRESS_FIELDS = {
    "epoch": int,
    "epoch_step": int,
    "global_step": int,
    "best_metric": (int, float),
    "skipped_steps": int,
    "wandb_id": (str, type(None)),
    "epoch_totals": (dict, type(None)),
    "logged_totals": (dict, type(None)),
}


def _progress(value: dict) -> Optional[str]:
    for field, types in _PROGRESS_FIELDS.items():
        if field not in value or not _is(value[field], types):
            return f"lacks a valid '{field}' ({value.get(field)!r:.40})"
        if types is int and value[field] < 0:
            return f"has a negative '{field}' ({value[field]})"
    return None


def _ema(value: dict) -> Optional[str]:
    if not isinstance(value.get("weights"), dict) or _state_dict(value["weights"]):
        return "lacks its 'weights' state_dict"
    if not _is(value.get("updates"), int) or value["updates"] < 0:
        return f"lacks a non-negative 'updates' count ({value.get('updates')!r:.40})"
    return None


def _config(value: dict) -> Optional[str]:
    for section in ("model", "data"):
        if not isinstance(value.get(section), dict) or not isinstance(value[section].get("name"), str):
            return f"lacks {section}.name"
    return None


def _data_spec(value: dict) -> Optional[str]:
    for key in ("channels", "num_classes", "image_size"):
        if not _is(value.get(key), int) or value[key] < 1:
            return f"lacks a positive integer '{key}'"
    return None


def _nonnegative(value: int) -> Optional[str]:
    return f"is negative ({value})" if value < 0 else None


# Format 2, in the order a problem is reported. A new component (e.g. model EMA) is one more
# `component=True` entry here, and its object in the checkpointer's components (components.py).
ENTRIES = (
    Entry("model", dict, INFERENCE, component=True, check=_state_dict),
    Entry("config", dict, INFERENCE, check=_config),
    Entry("data_spec", dict, INFERENCE, check=_data_spec),
    Entry("version", int, INFERENCE),
    Entry("optimizer", dict, RESUME, component=True, check=_optimizer),
    Entry("scheduler", dict, RESUME, component=True),
    Entry("epoch", int, RESUME, check=_nonnegative),
    Entry("step", int, RESUME, check=_nonnegative),
    Entry("best_metric", (int, float), RESUME),
    Entry("rng", dict, RESUME, component=True, check=_rng),
    Entry("progress", dict, RESUME, component=True, check=_progress),
    Entry("epoch_step", int, OPTIONAL, check=_nonnegative),
    Entry("scaler", dict, OPTIONAL, component=True),
    # model EMA (train.ema): {'weights': state_dict, 'updates': n}
    Entry("ema", dict, OPTIONAL, component=True, check=_ema),
    Entry("world_size", int, OPTIONAL),
    Entry("provenance", dict, OPTIONAL),  # versions, git commit, command line, hosts (runtime/provenance.py)
    # the training split's size: a resume on other data is refused
    Entry("train_samples", int, OPTIONAL, check=_nonnegative),
)
COMPONENTS = tuple(e.key for e in ENTRIES if e.component)
# The top-level copies of Progress's fields (DESIGN's contract: a reader finds epoch and step without
# knowing the components): top-level key -> progress field. Written at every save, never restored from.
PROGRESS_SUMMARY = {"epoch": "epoch", "epoch_step": "epoch_step", "step": "global_step", "best_metric": "best_metric"}
_TYPE_NAMES = {dict: "a mapping", int: "an integer", (int, float): "a number"}


def progress_summary(progress_state: dict) -> dict:
    return {key: progress_state[field] for key, field in PROGRESS_SUMMARY.items()}


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def upgrade_format_1(ckpt: dict) -> dict:
    """A format-1 checkpoint in the format-2 layout (and version): its top-level Progress fields
    gathered under `progress` (missing ones stay missing, for validation to name)."""
    old = {
        "epoch": "epoch",
        "epoch_step": "epoch_step",
        "global_step": "step",
        "best_metric": "best_metric",
        "skipped_steps": "skipped_steps",
        "wandb_id": "wandb_id",
        "epoch_totals": "meter",
        "logged_totals": "interval_meter",
    }
    defaults = {"epoch_step": 0, "skipped_steps": 0, "wandb_id": None, "epoch_totals": None, "logged_totals": None}
    progress = {
        field: ckpt.get(key, defaults.get(field)) for field, key in old.items() if key in ckpt or field in defaults
    }
    upgraded = {k: v for k, v in ckpt.items() if k not in ("skipped_steps", "wandb_id", "meter", "interval_meter")}
    upgraded["version"] = 2
    if "epoch" in ckpt:
        upgraded["progress"] = progress
        upgraded.setdefault("epoch_step", 0)
    return upgraded


def validate_checkpoint(ckpt, path, what: str = "checkpoint", resume: bool = True) -> dict:
    """The structure of a loaded checkpoint, from ENTRIES: every entry its use needs, with the
    right type and content. Returns it in the format-2 layout (a format-1 file upgraded).

    A file that fails is an `UnreadableCheckpoint` (so `--resume auto` falls back to an older one);
    a newer format version is a `UserError` (upgrade distcls).
    """
    def bad(problem: str) -> UnreadableCheckpoint:
        return UnreadableCheckpoint(f"{what} {path} is not a usable distcls checkpoint: {problem}")

    if not isinstance(ckpt, dict):
        raise bad(f"it holds a {type(ckpt).__name__}, not a dict of entries")
    if _is(ckpt.get("version"), int) and ckpt["version"] == 1:
        ckpt = upgrade_format_1(ckpt)
    needed = [e for e in ENTRIES if e.needed_by == INFERENCE or (resume and e.needed_by == RESUME)]
    missing = [e.key for e in needed if e.key not in ckpt]
    if missing:
        raise bad(
            f"it lacks {', '.join(repr(k) for k in missing)}" + (" (needed to resume training)" if resume else "")
        )
    checked = needed + [e for e in ENTRIES if e.needed_by == OPTIONAL and e.key in ckpt]
    for e in checked:
        if not _is(ckpt[e.key], e.types):
            raise bad(
                f"its '{e.key}' is {ckpt[e.key]!r:.60} ({type(ckpt[e.key]).__name__}), not "
                f"{_TYPE_NAMES.get(e.types, 'a valid value')}"
            )
    if ckpt["version"] > FORMAT_VERSION:
        raise UserError(
            f"{what} {path} has format version {ckpt['version']}, newer than this distcls ({FORMAT_VERSION}); upgrade "
            "distcls"
        )
    if ckpt["version"] < 1:
        raise bad(f"its format version {ckpt['version']} is not one distcls wrote")
    for e in checked:
        problem = e.check(ckpt[e.key]) if e.check is not None else None
        if problem:
            raise bad(f"its '{e.key}' {problem}")
    if resume:
        for key, field in PROGRESS_SUMMARY.items():
            if ckpt.get(key, 0) != ckpt["progress"][field]:
                raise bad(f"its '{key}' ({ckpt[key]}) differs from its progress's {field} ({ckpt['progress'][field]})")
    return ckpt


def read_checkpoint(path, what: str = "checkpoint", resume: bool = True) -> dict:
    """Load (weights-only, integrity-checked) and validate; `resume=False`: only what inference needs.
    The result has the format-2 layout whatever the file's format."""
    return validate_checkpoint(load_weights_only(path, what), path, what, resume)


def resume_reason(flag: Optional[str]) -> Optional[str]:
    """Why this run resumes: --resume, a torchrun restart, or a SLURM requeue (None: fresh start)."""
    if flag:
        return f"--resume {flag}"
    for name, what in (("TORCHELASTIC_RESTART_COUNT", "torchrun restart"), ("SLURM_RESTART_COUNT", "SLURM requeue")):
        if os.environ.get(name, "").strip() and dist._int_env(name) > 0:
            return f"{what} #{os.environ[name]}"
    return None
