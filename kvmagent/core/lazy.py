"""Deferred imports for heavy optional dependencies (docker SDK, pyroute2).

Loading every plugin's library at start-up costs ~15 MB of RSS on hosts that never use EIPs,
network groups or vhost targets; a lazy module is only imported on first attribute access.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
