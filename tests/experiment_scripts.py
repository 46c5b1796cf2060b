"""Import a script under ``experiments/`` as a module (the scripts are not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str) -> ModuleType:
    """``experiments/<name>.py`` imported as module ``name`` (registered in ``sys.modules`` so
    that its dataclasses and pickling work)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"experiments/{name}.py cannot be loaded")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
