"""Dataset registry: `@register_dataset("name")`, or `data.name=pkg.module:builder` for plug-ins.

A builder is `builder(cfg: DataConfig) -> RawDataset` and raises `UserError` when files are
missing (saying which files to put where).
"""
from __future__ import annotations

from typing import Callable

from distcls.runtime.plugins import Registry

DATASETS: Registry = Registry("dataset", "data.name", call=("cfg",))


def register_dataset(name: str) -> Callable:
    return DATASETS.register(name)
