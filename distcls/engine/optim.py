"""Optimizers, their parameter groups, and learning-rate schedules (warmup, then constant/cosine/step), per step or per
epoch."""

from __future__ import annotations

import math

import torch

from distcls.config import OptimConfig, SchedConfig
from distcls.models.transfer import classifier_head, is_head


# Normalization layers, found by module type as in torchvision's references (`set_weight_decay`);
# SyncBatchNorm is a _BatchNorm, torchvision's LayerNorm2d (ConvNeXt) a LayerNorm.
NORM_LAYERS = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
    *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()),
)


def decay_classes(model: torch.nn.Module) -> dict:
    """{parameter: "norm" | "norm_bias" | "bias" | "other"}: "norm" for a normalization layer's
    parameter other than its bias, "norm_bias" for its bias, "bias" for any other parameter named
    bias, "other" for the rest."""
    classes = {}
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False):
            norm = isinstance(module, NORM_LAYERS)
            classes.setdefault(
                p, ("norm_bias" if local == "bias" else "norm") if norm else "bias" if local == "bias" else "other"
            )
    return classes


def decay_of(kind: str, ndim: int, cfg: OptimConfig) -> tuple:
    """(group name, weight decay) of a parameter of `kind` (decay_classes) with `ndim` dims.

    With optim.norm_weight_decay and optim.bias_weight_decay both null: optim.weight_decay for
    tensors of 2+ dims, none for 1-d ones. With either set, by optim.decay_rule:
    - torchvision (null too): the groups of torchvision's references (`set_weight_decay` with
      --bias-weight-decay as its custom key "bias"): bias_weight_decay for every parameter named bias
      (normalization layers' included), then norm_weight_decay for normalization layers' parameters,
      weight_decay for everything else, 1-d tensors included;
    - by_ndim (distcls before the key, kept for its checkpoints): norm_weight_decay for normalization
      layers' parameters, bias_weight_decay for the other biases, each when set; otherwise 2+ dims
      take weight_decay and 1-d tensors none.
    """
    norm, bias = cfg.norm_weight_decay, cfg.bias_weight_decay
    if norm is None and bias is None:
        return ("decay", cfg.weight_decay) if ndim > 1 else ("no_decay", 0.0)
    if cfg.decay_rule in (None, "torchvision"):
        if bias is not None and kind in ("bias", "norm_bias"):
            return "bias", bias
        if norm is not None and kind in ("norm", "norm_bias"):
            return "norm", norm
        return "decay", cfg.weight_decay
    explicit = {"norm": norm, "norm_bias": norm, "bias": bias}
    if explicit.get(kind) is not None:
        return ("norm" if kind.startswith("norm") else "bias"), explicit[kind]
    return ("decay", cfg.weight_decay) if ndim > 1 else ("no_decay", 0.0)


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list:
    """The optimizer's parameter groups: learning rate by part (head / backbone), weight decay by
    kind (`decay_of`). A fixed order of groups, each kept only when it has parameters: with both
    decay keys null these are the two groups per part distcls always built, so older checkpoints'
    optimizer states still load."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kind = decay_classes(model)
    # Fine-tuning: the backbone learns at optim.lr * backbone_lr_scale, the classifier head at optim.lr.
    head = classifier_head(model) if cfg.backbone_lr_scale != 1.0 else None
    groups = []
    for part_lr, part in (
        (cfg.lr, [p for n, p in named if head is None or is_head(n, head)]),
        (cfg.lr * cfg.backbone_lr_scale, [p for n, p in named if head is not None and not is_head(n, head)]),
    ):
        decays = [decay_of(kind.get(p, "other"), p.ndim, cfg) for p in part]
        for name in ("decay", "no_decay", "norm", "bias"):
            members = [p for p, (group, _) in zip(part, decays) if group == name]
            value = next((wd for group, wd in decays if group == name), 0.0)
            groups.append({"params": members, "weight_decay": value, "lr": part_lr})
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


RMSPROP_EPS = 0.0316  # torchvision's references (train.py) build RMSprop with eps 0.0316 and alpha 0.9


def _eps(cfg: OptimConfig, default: float) -> dict:
    return {"eps": default if cfg.eps is None else cfg.eps}


OPTIMIZERS = {
    "sgd": _fused(
        lambda groups, cfg, **kw: torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **kw
        )
    ),
    "adam": _fused(
        lambda groups, cfg, **kw: torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), **_eps(cfg, 1e-8), **kw)
    ),
    "adamw": _fused(
        lambda groups, cfg, **kw: torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **_eps(cfg, 1e-8), **kw)
    ),
    "rmsprop": lambda groups, cfg: torch.optim.RMSprop(
        groups, lr=cfg.lr, alpha=cfg.alpha, momentum=cfg.momentum, **_eps(cfg, RMSPROP_EPS)
    ),
}


# The schedules after the warmup: factor(t, total, per_epoch, cfg), t units (steps, or epochs with
# sched.interval=epoch) since the warmup's end (the run's start for COUNTED_FROM_THE_START in step
# mode), total the units after the warmup, per_epoch the units of an epoch.
SCHEDULES = {
    "constant": lambda t, total, per_epoch, cfg: 1.0,
    "cosine": lambda t, total, per_epoch, cfg: 0.5 * (1 + math.cos(math.pi * min(1.0, t / max(1, total)))),
    "step": lambda t, total, per_epoch, cfg: cfg.gamma ** (t // (cfg.step_epochs * per_epoch)),
    "multistep": lambda t, total, per_epoch, cfg: cfg.gamma ** sum(t >= m * per_epoch for m in cfg.milestones),
    "exponential": lambda t, total, per_epoch, cfg: cfg.gamma ** (t / per_epoch),
    "poly": lambda t, total, per_epoch, cfg: (1.0 - min(t, total) / max(1, total)) ** cfg.power,
}
# per step: epochs from the run's start, warmup included (distcls's step schedule)
COUNTED_FROM_THE_START = ("step", "multistep")


def onecycle_factor(step: int, cfg: SchedConfig, total_steps: int) -> float:
    """torch's OneCycleLR (cos annealing, two phases) as a factor of optim.lr: from 1/div_factor up to 1
    over pct_start of the run, then down to 1/(div_factor x final_div_factor). The lr only: torch's
    cycle_momentum is not done."""
    start, end = 1.0 / cfg.div_factor, 1.0 / (cfg.div_factor * cfg.final_div_factor)
    peak_at = float(cfg.pct_start * total_steps) - 1

    def anneal(a, b, pct):
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

    if step <= peak_at:
        return anneal(start, 1.0, step / peak_at if peak_at > 0 else 1.0)
    return anneal(1.0, end, (step - peak_at) / max(1e-12, (total_steps - 1) - peak_at))


def lr_factor(step: int, cfg: SchedConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based), without the cosine floor
    (build_scheduler adds it). sched.interval=epoch: the factor of the step's epoch (epoch_factor)."""
    if cfg.interval == "epoch":
        return epoch_factor(step // steps_per_epoch, cfg, total_steps // steps_per_epoch)
    if cfg.name == "onecycle":
        return onecycle_factor(step, cfg, total_steps)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        if cfg.warmup_decay is None and cfg.warmup_method == "linear":  # distcls's ramp: 1/warmup, 2/warmup, ..., 1
            return (step + 1) / warmup
        decay = EPOCH_WARMUP_DECAY if cfg.warmup_decay is None else cfg.warmup_decay
        return decay + (1 - decay) * step / warmup if cfg.warmup_method == "linear" else decay
    t = step if cfg.name in COUNTED_FROM_THE_START else step - warmup
    return SCHEDULES[cfg.name](t, total_steps - warmup, steps_per_epoch, cfg)


EPOCH_WARMUP_DECAY = 0.01  # torchvision's --lr-warmup-decay default


def epoch_factor(epoch: int, cfg: SchedConfig, epochs: int) -> float:
    """sched.interval=epoch: torchvision's references' lr factor of `epoch` (0-based), the schedulers
    their train.py builds and steps once per epoch: LinearLR(start_factor=warmup_decay,
    total_iters=W) or ConstantLR(factor=warmup_decay, total_iters=W) for the W warmup epochs, then
    (SequentialLR, which restarts the main schedule at W) CosineAnnealingLR(T_max=epochs - W),
    StepLR(step_epochs, gamma), ExponentialLR(gamma), ... each counted from the warmup's end."""
    warmup = int(cfg.warmup_epochs)
    decay = EPOCH_WARMUP_DECAY if cfg.warmup_decay is None else cfg.warmup_decay
    if epoch < warmup:
        return decay + (1 - decay) * epoch / warmup if cfg.warmup_method == "linear" else decay
    return SCHEDULES[cfg.name](epoch - warmup, epochs - warmup, 1, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, optim_cfg: OptimConfig,
                    steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped after every optimizer step (with sched.interval=epoch its factor changes
    only at epoch boundaries): a function of the step alone, so a resume at any step is exact. The
    cosine ends at sched.min_lr (torchvision's eta_min): floor + (1 - floor) x the cosine factor,
    after the warmup."""
    total = steps_per_epoch * epochs
    floor = cfg.min_lr / optim_cfg.lr if cfg.name == "cosine" else 0.0
    warmup = (
        int(cfg.warmup_epochs) * steps_per_epoch
        if cfg.interval == "epoch"
        else int(round(cfg.warmup_epochs * steps_per_epoch))
    )

    def factor(step: int) -> float:
        f = lr_factor(step, cfg, steps_per_epoch, total)
        return floor + (1 - floor) * f if cfg.name == "cosine" and step >= warmup else f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
