"""The reward function examples/configs/grpo.yaml and ppo.yaml name (``rewards:brevity``; run with
``PYTHONPATH=examples/configs``): called as TRL calls GRPO's reward functions, one number per completion."""

from __future__ import annotations

from typing import Any


def _text(completion: Any) -> str:
    """A completion's text: a string, or the text parts of a conversational completion."""
    if isinstance(completion, str):
        return completion
    parts = [m.get("content", "") for m in completion]
    return " ".join(p if isinstance(p, str) else " ".join(c.get("text", "") for c in p) for p in parts)


def brevity(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """1.0 for an empty answer, falling towards 0 as it grows: a reward any tiny model can move."""
    return [1.0 / (1.0 + len(_text(c).split())) for c in completions]
