"""Resonance: align vision-language models from declarative YAML model specs."""

__version__ = "0.1.0"
