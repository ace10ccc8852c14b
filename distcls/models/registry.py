"""Model registry: `@register_model("name")`, or `model.name=pkg.module:builder` for plug-ins.

A builder is `builder(spec: DataSpec, cfg: ModelConfig, **cfg.args) -> nn.Module`; it sizes the
network from the data's channels, classes and image size.
"""
from __future__ import annotations

from typing import Callable

from distcls.runtime.plugins import Registry

MODELS: Registry = Registry("model", "model.name", call=("spec", "cfg"))


def register_model(name: str) -> Callable:
    return MODELS.register(name)
