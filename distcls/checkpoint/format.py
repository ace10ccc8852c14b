"""The checkpoint format: what a file holds, how it is checked, and the pieces saved with it.

A checkpoint is a plain dict of tensors and Python data, loadable with
`torch.load(path, weights_only=True)`; nothing is ever loaded any other way. Format 1 keys:
model, optimizer, scheduler, scaler (fp16 loss scale; {} otherwise), rng, the Progress fields at
the top level (epoch, epoch_step, step, best_metric, skipped_steps, meter, interval_meter,
wandb_id), config, data_spec, world_size, version.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

from distcls import dist
from distcls.atomic_files import UnreadableCheckpoint, load_weights_only
from distcls.errors import UserError

FORMAT_VERSION = 1


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
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------- validation


def all_finite(state_dict: dict) -> bool:
    return all(torch.isfinite(v).all().item() for v in state_dict.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def check_compatible(ckpt: dict, path, config: dict, spec: dict) -> None:
    """A checkpoint from another model, optimizer or data shape is refused, naming what differs.

    `config`/`spec`: this run's, as plain dicts (Config.to_dict(), DataSpec.to_dict())."""
    saved = ckpt["config"]
    for section, key in (("model", "name"), ("optim", "name")):
        value, wanted = (saved.get(section) or {}).get(key), config[section][key]
        if value is not None and value != wanted:
            raise UserError(f"checkpoint {path} was trained with {section}.{key}={value}, but the config says {section}.{key}={wanted}; "
                            f"use {section}.{key}={value} to resume it, or another run.out_dir for a new run")
    saved_spec = ckpt["data_spec"]
    for key in ("channels", "num_classes", "image_size"):
        if key in saved_spec and saved_spec[key] != spec[key]:
            raise UserError(f"checkpoint {path} expects {key}={saved_spec[key]}, but this data gives {key}={spec[key]}; use the checkpoint's data settings")


def model_mismatch(model: torch.nn.Module, state: dict) -> Optional[str]:
    """What keeps `state` from loading into `model` exactly (None: it fits)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} tensors differ in shape (e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
    if missing:
        parts.append(f"{len(missing)} model tensors are missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} are unknown to the model (e.g. {unexpected[0]})")
    return "; ".join(parts) or None


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    problem = model_mismatch(model, state)
    if problem:
        raise UserError(f"checkpoint {path} does not fit the model: {problem}")
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


def resume_reason(flag: Optional[str]) -> Optional[str]:
    """Why this run resumes: --resume, a torchrun restart, or a SLURM requeue (None: fresh start)."""
    if flag:
        return f"--resume {flag}"
    for name, what in (("TORCHELASTIC_RESTART_COUNT", "torchrun restart"), ("SLURM_RESTART_COUNT", "SLURM requeue")):
        if os.environ.get(name, "").strip() and dist._int_env(name) > 0:
            return f"{what} #{os.environ[name]}"
    return None
