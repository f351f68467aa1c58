"""Resonance: align vision-language models from declarative YAML model specs.

The seed's classes (:mod:`resonance.api`) are importable from here, ``from resonance import VLProcessor``, and
load torch only when one is first used: ``import resonance`` stays cheap for the compile-time commands.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Only class names reach resonance.api (and torch); submodule lookups such as `from resonance import codegen`
    # fall through to the import system untouched.
    if name[:1].isupper():
        api = importlib.import_module("resonance.api")
        if name in api.__all__:
            return getattr(api, name)
    raise AttributeError(f"module 'resonance' has no attribute {name!r}")
