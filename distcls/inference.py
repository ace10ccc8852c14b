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
from distcls.models import build_model


@dataclass
class Restored:
    cfg: Config
    spec: DataSpec
    model: torch.nn.Module
    preprocess: Preprocess
    checkpoint: dict


def restore(path: str, device: torch.device, overrides: Sequence[str] = ()) -> Restored:
    ckpt = read_checkpoint(path, "--checkpoint")
    base = copy.deepcopy(ckpt["config"])
    base["model"]["pretrained"] = None  # the checkpoint's own weights replace any starting point
    if base.get("data", {}).get("image_size") is None:  # e.g. taken from torchvision weights' preprocessing
        base.setdefault("data", {})["image_size"] = ckpt["data_spec"]["image_size"]
    saved = config_mod.from_dict(copy.deepcopy(ckpt["config"])) if "freeze" in base["model"] else None
    frozen = saved.model.frozen if saved is not None else bool(base["model"].get("freeze_backbone"))
    base["model"]["freeze"], base["model"]["freeze_backbone"] = "none", None
    cfg = config_mod.load(None, overrides, base=base)
    spec = DataSpec.from_dict(ckpt["data_spec"])
    model = build_model(cfg.model, spec)
    if frozen:
        from distcls.models.transfer import freeze_backbone
        model = freeze_backbone(model)  # same module types (FrozenBatchNorm2d) as when it was saved
    load_model_state(model, ckpt["model"], path)
    model.to(device).eval()
    pre = Preprocess(spec.channels, spec.image_size, spec.mean, spec.std, cfg.data.augment, cfg.run.seed)
    return Restored(cfg, spec, model, pre, ckpt)
