"""The seed documents' CNNs (../shared/SEEDS.md), sized from the data they are given."""
from __future__ import annotations

import torch.nn as nn

from distcls.config import ModelConfig
from distcls.spec import DataSpec
from distcls.errors import ConfigError
from distcls.models.registry import register_model


def _need(name: str, size: int, minimum: int, why: str) -> None:
    if size < minimum:
        raise ConfigError(
            f"model.name={name} needs images of at least {minimum}x{minimum} ({why}), got {size}x{size}; set "
            f"data.image_size={max(minimum, 32)}"
        )


@register_model("cnn2")
def cnn2(spec: DataSpec, cfg: ModelConfig, hidden: int = 1024, kernel: int = 5, stride: int = 1) -> nn.Module:
    """Seed A: conv 32 5x5 -> max-pool 2 -> conv 64 5x5 -> max-pool 2 -> fully connected -> classes.

    Padding keeps the spatial size (kernel // 2); stride and kernel can be set via model.args.
    """
    _need("cnn2", spec.image_size, 4 * stride, "two 2x2 max-pools")
    pad = kernel // 2
    size = spec.image_size
    for _ in range(2):
        size = ((size + 2 * pad - kernel) // stride + 1) // 2
    if size < 1:
        raise ConfigError(
            f"model.name=cnn2 with kernel {kernel}, stride {stride} shrinks {spec.image_size}x{spec.image_size} images "
            "to nothing; raise data.image_size"
        )
    return nn.Sequential(
        nn.Conv2d(spec.channels, 32, kernel, stride=stride, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel, stride=stride, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * size * size, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, spec.num_classes))


@register_model("lenet")
def lenet(spec: DataSpec, cfg: ModelConfig) -> nn.Module:
    """Seed B: conv 6 5x5 -> ReLU -> pool -> conv 16 5x5 -> ReLU -> pool -> fc 120 -> fc 84 -> classes."""
    _need("lenet", spec.image_size, 16, "two unpadded 5x5 convolutions and two 2x2 pools")
    size = ((spec.image_size - 4) // 2 - 4) // 2  # 32 -> 5, as in the paper (16*5*5 = 400)
    return nn.Sequential(
        nn.Conv2d(spec.channels, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * size * size, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, spec.num_classes))


@register_model("cnn3")
def cnn3(spec: DataSpec, cfg: ModelConfig, width: int = 32, hidden: int = 256, batch_norm: bool = False) -> nn.Module:
    """Seed C: three 3x3 convolutions (padding keeps the size), ReLU, 2x2 max-pool each, then FC layers."""
    _need("cnn3", spec.image_size, 8, "three 2x2 max-pools")
    layers, c_in = [], spec.channels
    for c_out in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(c_out)] if batch_norm else []
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c_in = c_out
    size = spec.image_size // 8
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * size * size, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, spec.num_classes))


@register_model("convnet")
def convnet(spec: DataSpec, cfg: ModelConfig) -> nn.Module:
    """Seed E: conv 3 3x3 -> sigmoid -> conv 6 3x3 -> sigmoid -> flatten (6*24*24 on MNIST) -> linear."""
    _need("convnet", spec.image_size, 5, "two unpadded 3x3 convolutions")
    size = spec.image_size - 4
    return nn.Sequential(
        nn.Conv2d(spec.channels, 3, 3, stride=1), nn.Sigmoid(),
        nn.Conv2d(3, 6, 3, stride=1), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(6 * size * size, spec.num_classes))
