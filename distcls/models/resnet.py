"""torchvision ResNets sized to the data: input channels, classes, and an optional CIFAR stem."""
from __future__ import annotations

import torch.nn as nn

from distcls.config import ModelConfig
from distcls.spec import DataSpec
from distcls.models.registry import register_model


def _resnet(arch: str, spec: DataSpec, cfg: ModelConfig, zero_init_residual: bool = False) -> nn.Module:
    import torchvision.models  # here, not at import time: it costs ~1 s and only the ResNets need it

    net = getattr(torchvision.models, arch)(
        weights=None, num_classes=spec.num_classes, zero_init_residual=zero_init_residual
    )
    if cfg.cifar_stem:
        net.conv1 = nn.Conv2d(spec.channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif spec.channels != 3:
        net.conv1 = nn.Conv2d(spec.channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


for _arch in ("resnet18", "resnet34", "resnet50"):
    register_model(_arch)(lambda spec, cfg, _a=_arch, **kw: _resnet(_a, spec, cfg, **kw))
