"""Checks at the edges of a training run, each one small function:

- `check_resume_config`: a resume whose config changes what the checkpoint's position or
  optimizer state means is refused, naming the key (docs/resume.md).
- `check_skipped_steps`: with `train.nonfinite=skip`, one warning line per epoch that skipped
  steps, and a stop (TrainingDiverged, exit 4) when skipped steps dominate an epoch.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from distcls.checkpoint import ResumePoint
from distcls import config as config_mod
from distcls.config import Config, TrainConfig
from distcls.errors import ConfigError, TrainingDiverged, UserError

# Which keys a resume refuses to see changed is metadata on the schema's fields (config.py: `resume=`):
# position keys change the seeded training order, the split, or how many samples a step or an epoch
# holds, so the checkpoint's (epoch, epoch_step) would name another sample (and the lr schedule, which
# counts steps, another point); schedule keys (every key of optim and sched) come from the checkpoint's
# optimizer state and schedule, like torchvision's and timm's --resume (a new lr is a new run from the
# checkpoint's weights: model.pretrained=CHECKPOINT); best keys say what the checkpoint's model EMA and
# best value mean; ema_rule keys say how its EMA averages.
POSITION_KEYS = tuple(config_mod.resume_keys("position"))
SCHEDULE_SECTIONS = config_mod.SCHEDULE_SECTIONS
BEST_KEYS = {
    "train.ema.enabled": (
        "the checkpoint carries a model EMA that this run would drop (its later checkpoints would have none for --ema)"
    ),
    "checkpoint.best_metric": (
        "the checkpoint's best value (and best.pt) follows the saved metric; this run would compare the other "
        "metric with it, so best.pt would follow neither"
    ),
}
assert set(BEST_KEYS) == set(config_mod.resume_keys("best")), (
    "every key marked resume='best' in config.py needs its reason here"
)
# How the checkpoint's EMA averages: a change would continue it under another rule than the one it
# was built with (train.epochs too when train.ema.adjust_decay derives the decay from it).
_EMA_RULE = (
    "the checkpoint's model EMA was averaged with the saved value; this run would continue it under another rule"
)
EMA_KEYS = {key: _EMA_RULE for key in config_mod.resume_keys("ema_rule")}


# Keys added after checkpoints were written without them: the value that gives such a checkpoint
# its meaning (an image folder's val/ was the test split, validation carved from train/; the weight
# decay keys grouped 1-d tensors only).
SAVED_BEFORE_THE_KEY = {
    "data.carve_val": True,
    "optim.decay_rule": "by_ndim",
    "sched.interval": "step",
    "sched.warmup_method": "linear",
    "sched.warmup_decay": None,
    "train.ema.cadence": "run",
}
# Of those, the keys whose null is decided at the start: what null means for a run that resumes nothing.
NEW_RUN_VALUE = {"data.carve_val": False, "optim.decay_rule": "torchvision"}


def resolve_unset(cfg: Config, point: Optional[ResumePoint], note: Callable[[str], None]) -> Config:
    """`cfg` with its run-time defaults decided: a key of NEW_RUN_VALUE left null is the resumed
    checkpoint's value (SAVED_BEFORE_THE_KEY's for one written before the key), else NEW_RUN_VALUE's.
    The decided values are stored with the run."""
    saved = (point.config or {}) if point is not None else {}
    for key in NEW_RUN_VALUE:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) is not None:
            continue
        value = NEW_RUN_VALUE[key]
        if point is not None:
            value = _get_or(saved, key, SAVED_BEFORE_THE_KEY[key])
            if name not in saved.get(section, {}) and _predates(key, cfg):
                note(f"checkpoint {point.path} predates {key}: {PREDATES[key]}")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg


PREDATES = {
    "data.carve_val": (
        "it keeps its meaning (validation carved from train/, val/ the test split); a new run takes torchvision's "
        "(val/ validates every epoch)"
    ),
    "optim.decay_rule": (
        "its weight decay groups stay as they were (optim.decay_rule=by_ndim: the decay keys for 1-d tensors "
        "only); a new run takes torchvision's set_weight_decay groups"
    ),
}


def _predates(key: str, cfg: Config) -> bool:
    """Whether the key's old meaning makes a difference to this run (the note is worth a line)."""
    if key == "data.carve_val":
        return cfg.data.name == "imagefolder"
    return cfg.optim.norm_weight_decay is not None or cfg.optim.bias_weight_decay is not None


def _get(tree: dict, path: str):
    """The value at a dot path, or KeyError when a section or key is absent (an older config)."""
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            raise KeyError(path)
        tree = tree[part]
    return tree


def _get_or(tree: dict, path: str, default):
    try:
        return _get(tree, path)
    except KeyError:
        return default


def _keys_to_compare(saved: dict, current: dict) -> list[str]:
    # the synthetic dataset's own keys matter only for it
    synthetic = current.get("data", {}).get("name") == "synthetic"
    keys = [k for k in POSITION_KEYS if synthetic or not k.startswith("data.synthetic.")]
    if current.get("data", {}).get("name") != "imagefolder":  # the image folders' own key
        keys.remove("data.carve_val")
    for section in SCHEDULE_SECTIONS:
        keys += [f"{section}.{k}" for k in current.get(section, {})]
    ema = (current.get("train") or {}).get("ema") or {}
    if ema.get("enabled"):
        keys += list(EMA_KEYS) + (["train.epochs"] if ema.get("adjust_decay") else [])
    return keys + list(BEST_KEYS)


def changed_resume_keys(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) of every refused key that differs; keys either config lacks are skipped."""
    changed = []
    for key in _keys_to_compare(saved, current):
        try:
            old, new = (
                _get(saved, key) if key not in SAVED_BEFORE_THE_KEY else _get_or(saved, key, SAVED_BEFORE_THE_KEY[key]),
                _get(current, key),
            )
        except KeyError:
            continue
        if old != new:
            changed.append((key, old, new))
    return changed


def check_resume_config(point: ResumePoint, cfg: Config, train_samples: Optional[int] = None) -> None:
    """Refuse to resume from `point` when `cfg` changes a key of POSITION_KEYS or of the
    optimizer/schedule: one ConfigError naming the key, both values and what to do; then when the
    training split (`train_samples`) holds another number of samples than the checkpoint's (its
    position would name other samples: shards or an image folder changed under it)."""
    path, epoch, epoch_step = point.path, point.epoch, point.epoch_step
    trained = epoch + (1 if epoch_step else 0)  # epochs the checkpoint has trained in (its last one maybe in part)
    if cfg.train.epochs < trained:
        where = f"{epoch} epochs and {epoch_step} steps of epoch {epoch + 1}" if epoch_step else f"{epoch} epochs"
        raise ConfigError(
            f"checkpoint {path} has trained {where}, more than train.epochs={cfg.train.epochs}: the run cannot go back "
            f"(its summary would misstate what trained); resume with train.epochs={max(trained, cfg.train.epochs + 1)} "
            f"or more, or evaluate it: python -m distcls.evaluate --checkpoint {path}"
        )
    changed = changed_resume_keys(point.config or {}, cfg.to_dict())
    saved_samples = point.checkpoint.get("train_samples")
    if not changed and saved_samples is not None and train_samples is not None and saved_samples != train_samples:
        raise UserError(
            f"checkpoint {path} trained on a training split of {saved_samples:,} samples, but this data gives "
            f"{train_samples:,}: its position (epoch, step) would name other samples; resume with the data it trained "
            f"on, or start a new run from its weights: model.pretrained={path} run.out_dir=NEW_DIR"
        )
    if not changed:
        return
    key, old, new = changed[0]
    where = f"epoch {epoch + 1}, step {epoch_step}" if epoch_step else f"the end of epoch {epoch}"
    if key == "train.epochs":
        key_why = "train.ema.adjust_decay=true derives the EMA's decay from train.epochs, so " + _EMA_RULE
        why = (
            f"{key_why}; resume with {key}={_show(old)}, or start a new run from its weights: "
            f"model.pretrained={path} run.out_dir=NEW_DIR"
        )
    elif key in BEST_KEYS or key in EMA_KEYS:
        why = (
            f"{BEST_KEYS.get(key) or EMA_KEYS[key]}; resume with {key}={_show(old)}, or start a new run from its "
            f"weights: model.pretrained={path} run.out_dir=NEW_DIR"
        )
    elif key.split(".")[0] in SCHEDULE_SECTIONS:
        why = ("a resume continues the checkpoint's optimizer state and lr schedule, so the new value would not run; "
               f"resume with {key}={_show(old)}, or start a new run from its weights with the new value: "
               f"model.pretrained={path} {key}={_show(new)} run.out_dir=NEW_DIR")
    else:
        why = (
            f"its saved position ({where}) counts samples of the seeded training order, which {key} changes, so the "
            "run would continue at another sample and another point of the lr schedule; resume with "
            f"{key}={_show(old)} (the world size, train.accum_steps and train.epochs may change), or start a new run "
            f"from its weights: model.pretrained={path} run.out_dir=NEW_DIR"
        )
    also = f" (also changed: {', '.join(k for k, _, _ in changed[1:])})" if len(changed) > 1 else ""
    raise ConfigError(
        f"checkpoint {path} was saved with {key}={_show(old)}, but this run says {key}={_show(new)}{also}; {why}"
    )


def _show(value) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value).replace(" ", "")
    return text if len(text) <= 60 else text[:57] + "..."


def check_skipped_steps(epoch: int, skipped: int, steps: int, train: TrainConfig, warn: Callable[[str], None],
                        skipped_total: Optional[int] = None) -> None:
    """After epoch `epoch` (1-based) ran `steps` steps of which `skipped` were skipped as non-finite:
    warn (one line), and raise TrainingDiverged when more than train.max_skipped_fraction of them
    were skipped (every rank holds the same agreed counts, so every rank raises)."""
    if not skipped:
        return
    total = f"; {skipped_total} in all" if skipped_total is not None and skipped_total != skipped else ""
    if skipped > train.max_skipped_fraction * steps:
        raise TrainingDiverged(
            f"epoch {epoch}: {skipped} of {steps} steps skipped as non-finite (train.nonfinite=skip), more than "
            f"train.max_skipped_fraction={train.max_skipped_fraction:g}: the model is not training; lower optim.lr, "
            "set "
            "train.clip_grad_norm or use train.amp=bf16 instead of fp16 (no checkpoint is saved at this epoch's end)"
        )
    warn(
        f"epoch {epoch}: {skipped} of {steps} steps skipped as non-finite loss or gradients "
        f"(train.nonfinite=skip){total}; the run stops if more than "
        f"train.max_skipped_fraction={train.max_skipped_fraction:g} of an epoch's steps are skipped"
    )
