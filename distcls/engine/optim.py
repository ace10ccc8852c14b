"""Optimizers and per-step learning-rate schedules (linear warmup, then constant/cosine/step)."""
from __future__ import annotations

import math

import torch

from distcls.config import OptimConfig, SchedConfig
from distcls.models.transfer import classifier_head, is_head


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Fine-tuning: the backbone learns at optim.lr * backbone_lr_scale, the classifier head at optim.lr.
    head = classifier_head(model) if cfg.backbone_lr_scale != 1.0 else None
    groups = []
    for part_lr, part in ((cfg.lr, [p for n, p in named if head is None or is_head(n, head)]),
                          (cfg.lr * cfg.backbone_lr_scale, [p for n, p in named if head is not None and not is_head(n, head)])):
        # No weight decay on biases and normalization parameters (1-d tensors), as in the torchvision recipes.
        groups += [{"params": [p for p in part if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr": part_lr},
                   {"params": [p for p in part if p.ndim <= 1], "weight_decay": 0.0, "lr": part_lr}]
    groups = [g for g in groups if g["params"]]
    optimizer = OPTIMIZERS[cfg.name](groups, cfg)
    if cfg.name == "sgd" and cfg.momentum:
        # Zero momentum buffers before the first step (m = 0 * momentum + g equals torch's first
        # step, m = g): a fused SGD whose FIRST update is skipped (found_inf) would otherwise keep
        # the uninitialized buffers it allocated for it.
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def _fused(make):
    """Build with torch's fused kernel (one launch per step; it can skip an update on the device,
    see engine/precision.py), or the default implementation where fused is not available."""
    def build(groups, cfg: OptimConfig):
        try:
            return make(groups, cfg, fused=True)
        except (RuntimeError, ValueError, TypeError):
            return make(groups, cfg)
    return build


OPTIMIZERS = {
    "sgd": _fused(lambda groups, cfg, **kw: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                             nesterov=cfg.nesterov and cfg.momentum > 0, **kw)),
    "adam": _fused(lambda groups, cfg, **kw: torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kw)),
    "adamw": _fused(lambda groups, cfg, **kw: torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kw)),
}


def lr_factor(step: int, cfg: SchedConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, optim_cfg: OptimConfig,
                    steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = steps_per_epoch * epochs
    floor = cfg.min_lr / optim_cfg.lr if cfg.name == "cosine" else 0.0

    def factor(step: int) -> float:
        f = lr_factor(step, cfg, steps_per_epoch, total)
        return floor + (1 - floor) * f if cfg.name == "cosine" and step >= int(round(cfg.warmup_epochs * steps_per_epoch)) else f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
