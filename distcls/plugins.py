"""Name -> builder registries, with `pkg.module:function` import paths for plug-ins."""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from distcls.errors import ConfigError


class Registry:
    """`kind` builders under names; `call` names the positional arguments every builder receives."""

    def __init__(self, kind: str, config_key: str, call: tuple[str, ...]):
        self.kind, self.config_key, self.call = kind, config_key, call
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
            if fn is None:
                raise ConfigError(f"{self.config_key}={name}: module '{module_name}' has no callable '{attr}'")
            if not inspect.isfunction(fn):  # builtins (os.system), classes, objects: not builders, never called
                raise ConfigError(f"{self.config_key}={name}: '{attr}' is a {type(fn).__name__}, not a builder function "
                                  f"def {attr}({', '.join(self.call)}, ...)")
            return fn
        raise ConfigError(f"unknown {self.kind} {self.config_key}={name}; choose one of {', '.join(self.names())} or give 'pkg.module:builder'")

    def build(self, name: str, *args, kwargs: dict | None = None, kwargs_key: str = ""):
        """Look up `name` and call it with `args` (+ keyword `kwargs` from config key `kwargs_key`),
        after checking that its signature accepts them: a mismatch is a clear error, not a TypeError
        from inside the builder."""
        fn = self.get(name)
        kwargs = kwargs or {}
        try:
            inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as exc:
            if kwargs:
                raise ConfigError(f"{kwargs_key}={kwargs} do not fit {self.config_key}={name} ({exc}); "
                                  f"its parameters are {inspect.signature(fn)}") from None
            raise ConfigError(f"{self.config_key}={name} is not a {self.kind} builder: it must accept "
                              f"({', '.join(self.call)}), its signature is {inspect.signature(fn)}") from None
        except ValueError:
            pass  # no introspectable signature: call it and let it say
        return fn(*args, **kwargs)
