"""Rebuild a trained model from a checkpoint (for evaluate and predict)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from distcls import config as config_mod
from distcls.checkpoint import load_model_state, read_checkpoint
from distcls.config import Config
from distcls.data import DataSpec, Preprocess
from distcls.errors import ConfigError, UserError
from distcls.models import build_model


@dataclass
class Restored:
    cfg: Config
    spec: DataSpec
    model: torch.nn.Module
    preprocess: Preprocess
    checkpoint: dict


def _explicit_keys(overrides: Sequence[str]) -> set:
    return {config_mod.parse_override(o)[0] for o in overrides}


def check_stored_plugins(stored: dict, path, overrides: Sequence[str], sections=("model",)) -> None:
    """A checkpoint must not choose code to import: a plug-in path stored in it ('pkg.module:builder')
    is used only when the user names it on the command line too. `sections`: the builders to be used."""
    explicit = _explicit_keys(overrides)
    for section in sections:
        name = stored[section]["name"]
        if ":" in name and f"{section}.name" not in explicit:
            raise UserError(f"checkpoint {path} was trained with the plug-in {section}.name={name}; a checkpoint does not choose code "
                            f"to import: add {section}.name={name} to the command line if you trust that module")


def restore(path: str, device: torch.device, overrides: Sequence[str] = ()) -> Restored:
    ckpt = read_checkpoint(path, "--checkpoint", resume=False)
    base = copy.deepcopy(ckpt["config"])
    check_stored_plugins(base, path, overrides)
    frozen = bool(base["model"].get("freeze_backbone"))
    base["model"]["pretrained"] = None  # the checkpoint's own weights replace any starting point
    base["model"]["freeze_backbone"] = False
    try:
        cfg = config_mod.load(None, overrides, base=base)
    except ConfigError as exc:
        raise UserError(f"checkpoint {path}: its stored config with your overrides is invalid: {exc}") from None
    spec = DataSpec.from_dict(ckpt["data_spec"])
    model = build_model(cfg.model, spec)
    if frozen:
        from distcls.models.transfer import freeze_backbone
        model = freeze_backbone(model)  # same module types (FrozenBatchNorm2d) as when it was saved
    load_model_state(model, ckpt["model"], path)
    model.to(device).eval()
    pre = Preprocess(spec.channels, spec.image_size, spec.mean, spec.std, cfg.data.augment, cfg.run.seed)
    return Restored(cfg, spec, model, pre, ckpt)
