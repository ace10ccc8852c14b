"""Optimizers and per-step learning-rate schedules (linear warmup, then constant/cosine/step)."""
from __future__ import annotations

import math

import torch

from distcls.config import OptimConfig, SchedConfig
from distcls.models.transfer import classifier_head, is_head


# Normalization layers, found by module type as in torchvision's references (`set_weight_decay`);
# SyncBatchNorm is a _BatchNorm, torchvision's LayerNorm2d (ConvNeXt) a LayerNorm.
NORM_LAYERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm, torch.nn.GroupNorm,
               torch.nn.LayerNorm, torch.nn.LocalResponseNorm, *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()))


def decay_classes(model: torch.nn.Module) -> dict:
    """{parameter: "norm" | "bias" | "other"}: "norm" for a parameter of a normalization layer (weight
    and bias), "bias" for any other parameter named bias, "other" for the rest."""
    classes = {}
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False):
            classes.setdefault(p, "norm" if isinstance(module, NORM_LAYERS) else "bias" if local == "bias" else "other")
    return classes


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list:
    """The optimizer's parameter groups: learning rate by part (head / backbone), weight decay by kind.

    Weight decay: optim.norm_weight_decay for normalization layers' parameters and
    optim.bias_weight_decay for the other biases when set; otherwise (null, and for every other
    parameter) optim.weight_decay for tensors of 2+ dims and none for 1-d ones (biases and
    normalization parameters: distcls's rule before these keys, the groups of older checkpoints).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kind = decay_classes(model)
    explicit = {"norm": cfg.norm_weight_decay, "bias": cfg.bias_weight_decay}

    def bucket(p) -> str:
        k = kind.get(p, "other")
        if explicit.get(k) is not None:
            return k
        return "decay" if p.ndim > 1 else "no_decay"

    decay = {"decay": cfg.weight_decay, "no_decay": 0.0, "norm": cfg.norm_weight_decay, "bias": cfg.bias_weight_decay}
    # Fine-tuning: the backbone learns at optim.lr * backbone_lr_scale, the classifier head at optim.lr.
    head = classifier_head(model) if cfg.backbone_lr_scale != 1.0 else None
    groups = []
    for part_lr, part in ((cfg.lr, [p for n, p in named if head is None or is_head(n, head)]),
                          (cfg.lr * cfg.backbone_lr_scale, [p for n, p in named if head is not None and not is_head(n, head)])):
        # A fixed order of groups, each kept only when it has parameters: with both keys null these are
        # the two groups per part distcls always built, so older checkpoints' optimizer states still load.
        for name in ("decay", "no_decay", "norm", "bias"):
            groups.append({"params": [p for p in part if bucket(p) == name], "weight_decay": decay[name], "lr": part_lr})
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
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
