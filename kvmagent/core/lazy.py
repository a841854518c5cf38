"""Deferred imports for heavy optional dependencies (docker SDK, pyroute2).

Loading every plugin's library at start-up costs ~15 MB of RSS on hosts that never use EIPs,
network groups or vhost targets; a lazy module is only imported on first attribute access.

The first access may come from many executor threads at once (16 concurrent health checks
after a start). ``importlib.util.LazyLoader`` is not safe for that before Python 3.12: a
second thread sees the half-executed module ("module 'docker' has no attribute 'errors'").
So the stand-in here imports the real module completely, under a lock, with the ordinary
import machinery, before any attribute is handed out.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """Stands for module ``name`` until the first attribute access imports it."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_lazy_lock"] = threading.Lock()
        self.__dict__["_lazy_module"] = None

    def _load(self) -> ModuleType:
        module = self.__dict__["_lazy_module"]
        if module is None:
            with self.__dict__["_lazy_lock"]:
                module = self.__dict__["_lazy_module"]
                if module is None:
                    module = importlib.import_module(self.__name__)
                    self.__dict__["_lazy_module"] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._load())


def lazy_import(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ImportError(f"no module named {name!r}")
    return LazyModule(name)
