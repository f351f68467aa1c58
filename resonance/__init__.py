"""Resonance: align vision-language models from declarative YAML model specs.

The seed's classes (:mod:`resonance.api`) are importable from here, ``from resonance import VLProcessor``, and
load torch only when one is first used: ``import resonance`` stays cheap for the compile-time commands.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API_NAMES = frozenset(
    {
        "ImageInput",
        "ModelCoreMapper",
        "VLDPODataCollatorWithPadding",
        "VLDPOTrainer",
        "VLGRPOTrainer",
        "VLModel",
        "VLModelWithValueHead",
        "VLPPOTrainer",
        "VLProcessor",
        "VLPromptCollator",
        "VLRewardDataCollatorWithPadding",
        "VLRewardModel",
        "VLRewardTrainer",
        "VLSFTDataCollatorWithPadding",
        "VLSFTTrainer",
    }
)


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        return getattr(importlib.import_module("resonance.api"), name)
    raise AttributeError(f"module 'resonance' has no attribute {name!r}")
