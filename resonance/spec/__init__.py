"""Spec schema and loader (no torch, no transformers)."""

from resonance.spec.loader import SpecError, SpecProblem, load_spec
from resonance.spec.schema import ModelSpec

__all__ = ["ModelSpec", "SpecError", "SpecProblem", "load_spec"]
