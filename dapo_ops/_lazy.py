"""Lazy re-exports for the package and its subpackages: a name is imported on first access, so importing one
subpackage loads only that subpackage's dependencies (PEP 562 module `__getattr__`)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def explicit(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """`__getattr__` serving each name of `exports` from the module it maps to."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__


def searching(package: str, path: Sequence[str]) -> Callable[[str], Any]:
    """`__getattr__` serving a subpackage's modules, then any public name one of them defines (modules in
    name order), so `from dapo_ops.data import load_mc_dataset` works without a list to keep up to date."""

    def __getattr__(name: str) -> Any:
        modules = sorted(info.name for info in pkgutil.iter_modules(path))
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        if not name.startswith("_"):
            for module in modules:
                found = importlib.import_module(f"{package}.{module}")
                if name in vars(found):
                    return vars(found)[name]
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
