"""Compile time: specs -> adapters. Never imports torch or transformers.

``schema`` (the pydantic spec), ``loader`` (YAML with source positions), ``hooks`` (the override catalogue),
``overrides`` (checks of hand-written hook modules), ``render`` (templates, literals, banners) and ``project``
(which specs are in use: a project's or the packaged ones; the plan of generated files, the drift check, atomic
writes). The names below are the compile-time API.
"""

from resonance.codegen.loader import load_spec
from resonance.codegen.project import (
    OUTPUT_DIR,
    SPECS_DIR,
    Drift,
    Plan,
    SpecSource,
    apply,
    compare,
    files_project,
    find_project,
    load_specs,
    named_spec,
    packaged_root,
    plan,
    project_specs,
    relative,
    require_project,
    spec_source,
)
from resonance.codegen.schema import ModelSpec

__all__ = [
    "OUTPUT_DIR",
    "SPECS_DIR",
    "Drift",
    "ModelSpec",
    "Plan",
    "SpecSource",
    "apply",
    "compare",
    "files_project",
    "find_project",
    "load_spec",
    "load_specs",
    "named_spec",
    "packaged_root",
    "plan",
    "project_specs",
    "relative",
    "require_project",
    "spec_source",
]
