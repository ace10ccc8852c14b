"""Name -> builder registries, with `pkg.module:function` import paths for plug-ins."""
from __future__ import annotations

import importlib
from typing import Callable

from distcls.errors import ConfigError


class Registry:
    def __init__(self, kind: str, config_key: str):
        self.kind, self.config_key = kind, config_key
        self._builders: dict[str, Callable] = {}

    def register(self, name: str) -> Callable:
        def decorate(fn: Callable) -> Callable:
            if name in self._builders and self._builders[name] is not fn:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._builders[name] = fn
            return fn
        return decorate

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str) -> Callable:
        if name in self._builders:
            return self._builders[name]
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise ConfigError(f"{self.config_key}={name}: cannot import module '{module_name}' ({exc}); check the name and PYTHONPATH") from None
            fn = getattr(module, attr, None)
            if not callable(fn):
                raise ConfigError(f"{self.config_key}={name}: module '{module_name}' has no callable '{attr}'")
            return fn
        raise ConfigError(f"unknown {self.kind} {self.config_key}={name}; choose one of {', '.join(self.names())} or give 'pkg.module:builder'")
