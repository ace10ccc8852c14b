"""Name -> builder registries, with `pkg.module:function` import paths for plug-ins."""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Callable

from distcls.errors import ConfigError


class Registry:
    """`kind` builders under names; `call` names the positional arguments every builder receives."""

    def __init__(self, kind: str, config_key: str, call: tuple[str, ...]):
        self.kind, self.config_key, self.call = kind, config_key, call
        self._builders: dict[str, Callable] = {}
        self._families: dict[str, tuple[Callable, Callable]] = {}  # prefix -> (resolve(rest) -> builder, names())

    def register(self, name: str) -> Callable:
        def decorate(fn: Callable) -> Callable:
            if name in self._builders and self._builders[name] is not fn:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._builders[name] = fn
            return fn
        return decorate

    def register_family(self, prefix: str, resolve: Callable[[str], Callable], names: Callable[[], list]) -> None:
        """Builders named `<prefix><rest>` (e.g. torchvision:resnet101): `resolve(rest)` returns the
        builder (or raises ConfigError), `names()` lists the valid rests (for close matches)."""
        self._families[prefix] = (resolve, names)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def is_import_path(self, name: str) -> bool:
        """A 'pkg.module:function' plug-in path (code to import), not a registered name or family."""
        return ":" in name and name not in self._builders and not any(name.startswith(p) for p in self._families)

    def _close_matches(self, name: str) -> list[str]:
        family = [prefix + n for prefix, (_, names) in self._families.items() for n in names()]
        exact = [f for f in family if f.split(":", 1)[-1] == name]  # resnet101 -> torchvision:resnet101
        return exact or difflib.get_close_matches(name, self.names() + family, n=3, cutoff=0.7)

    def get(self, name: str) -> Callable:
        if name in self._builders:
            return self._builders[name]
        for prefix, (resolve, _) in self._families.items():
            if name.startswith(prefix):
                return resolve(name[len(prefix):])
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise ConfigError(
                    f"{self.config_key}={name}: cannot import module '{module_name}' ({exc}); check the name and "
                    "PYTHONPATH"
                ) from None
            fn = getattr(module, attr, None)
            if fn is None:
                raise ConfigError(f"{self.config_key}={name}: module '{module_name}' has no callable '{attr}'")
            if not inspect.isfunction(fn):  # builtins (os.system), classes, objects: not builders, never called
                raise ConfigError(
                    f"{self.config_key}={name}: '{attr}' is a {type(fn).__name__}, not a builder function "
                    f"def {attr}({', '.join(self.call)}, ...)"
                )
            return fn
        close = self._close_matches(name)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        families = "".join(f", {p}<name>" for p in self._families)
        raise ConfigError(
            f"unknown {self.kind} {self.config_key}={name}; {hint}choose one of {', '.join(self.names())}{families} or "
            "give 'pkg.module:builder'"
        )

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
