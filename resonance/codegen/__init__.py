"""Compile time: specs -> adapters. Never imports torch or transformers.

``schema`` (the pydantic spec), ``loader`` (YAML with source positions), ``hooks`` (the override catalogue),
``overrides`` (checks of hand-written hook modules), ``render`` (templates, literals, banners) and ``project``
(the plan of generated files, the drift check, atomic writes). The names below are the compile-time API.
"""

from resonance.codegen.loader import load_spec
from resonance.codegen.project import (
    OUTPUT_DIR,
    SPECS_DIR,
    Drift,
    Plan,
    apply,
    compare,
    load_specs,
    plan,
    project_specs,
    relative,
)
from resonance.codegen.schema import ModelSpec

__all__ = [
    "OUTPUT_DIR",
    "SPECS_DIR",
    "Drift",
    "ModelSpec",
    "Plan",
    "apply",
    "compare",
    "load_spec",
    "load_specs",
    "plan",
    "project_specs",
    "relative",
]
