"""Load the repository's stand-alone scripts (not packages) as modules, by path."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_script(relative: str) -> ModuleType:
    """The script at ``ROOT / relative``, run as a fresh module named after its file."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def installed_size() -> ModuleType:
    """images/installed_size.py: pyproject.toml's declarations and the dependency walk the
    image-size figures, the image boundaries and the extras' boundaries all use."""
    return load_script("images/installed_size.py")
