"""``--compile_layers``'s values: ``auto``, ``true`` or ``false``, read once here for the flag checks (which run
before anything loads: transformers' parser helper is imported only when a value is read)."""

from __future__ import annotations

from typing import Any

from resonance.errors import ConfigError


def compile_choice(value: Any) -> str:
    """``--compile_layers``'s value as ``"auto"``, ``"true"`` or ``"false"`` (a bool, or the words
    transformers' parser takes for one: true/false, yes/no, 1/0, any case)."""
    from transformers.hf_argparser import string_to_bool

    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text == "auto":
        return text
    try:
        return "true" if string_to_bool(text) else "false"
    except Exception:  # argparse.ArgumentTypeError
        raise ConfigError(f"--compile_layers {value}: expected auto, true or false") from None


def compile_asked(value: Any) -> bool:
    """Whether ``--compile_layers`` was given as true, not ``auto`` or false; a value of neither kind is the flag's
    own error (:func:`compile_choice`)."""
    try:
        return compile_choice(value) == "true"
    except ConfigError:
        return False
