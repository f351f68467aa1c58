"""Reward functions named on the command line (``--reward_funcs pkg.module:function``), shared by GRPO and PPO.

A reward function is called the way TRL calls GRPO reward functions, so one file serves both trainers::

    f(prompts=[conversation], completions=[[{"role": "assistant", "content": text}]],
      completion_ids=[[token ids]], images=[[PIL images]], source=["FILE:LINE"], id=[...], **kwargs)

and returns one finite number per completion. Every call is checked (:func:`checked_reward`): an exception, a
wrong count, or a value that is not a finite number (``None``, NaN, inf) is a :class:`RewardFunctionError`
naming the function and the row, never a silent zero.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
from dataclasses import field
from typing import Any

import torch

from resonance.errors import RewardFunctionError


def reward_funcs_field(also: str = "") -> Any:
    """The ``--reward_funcs`` flag, for every config that takes it (GRPO, PPO): one definition, one help text."""
    return field(
        default=None,
        metadata={
            "help": "Comma list of reward functions as importable 'module:function' names, e.g. "
            "'my_rewards:exact_match'; their values are summed. Each is called as TRL calls GRPO reward functions: "
            "f(prompts=..., completions=..., completion_ids=..., images=..., source=..., id=..., **kwargs) and "
            "returns one finite number per completion." + also
        },
    )


def load_reward_funcs(names: str | None) -> list[Any]:
    """``"a.b:f,c:g"`` -> the functions, each wrapped by :func:`checked_reward`. Errors name ``--reward_funcs``."""
    if not names or not names.strip():
        raise RewardFunctionError("--reward_funcs is required: e.g. --reward_funcs my_rewards:exact_match")
    funcs = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        module_name, colon, attribute = name.partition(":")
        if not colon or not module_name or not attribute:
            raise RewardFunctionError(
                f"--reward_funcs {name!r}: write a reward function as 'module:function' (e.g. my_rewards:exact_match)"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RewardFunctionError(
                f"--reward_funcs {name!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
            ) from exc
        func = module
        for part in attribute.split("."):
            if not hasattr(func, part):
                raise RewardFunctionError(f"--reward_funcs {name!r}: module {module_name!r} has no {attribute!r}")
            func = getattr(func, part)
        if not callable(func):
            raise RewardFunctionError(f"--reward_funcs {name!r}: {attribute!r} is not callable")
        if inspect.iscoroutinefunction(func):
            raise RewardFunctionError(f"--reward_funcs {name!r}: async reward functions are not supported")
        funcs.append(checked_reward(func, name))
    if not funcs:
        raise RewardFunctionError("--reward_funcs names no function")
    return funcs


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def checked_reward(func: Any, name: str) -> Any:
    """``func`` with its calls checked; keeps its ``__name__`` (TRL logs ``rewards/<name>/mean``)."""

    @functools.wraps(func)
    def reward(*, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        sources = kwargs.get("source") or ["<row>"] * len(prompts)
        try:
            values = func(prompts=prompts, completions=completions, **kwargs)
        except Exception as exc:
            raise RewardFunctionError(
                f"reward function {name} (--reward_funcs) raised {type(exc).__name__}: {exc} "
                f"(batch rows {sorted(set(sources))})"
            ) from exc
        if isinstance(values, torch.Tensor):
            values = values.flatten().tolist()
        try:
            values = list(values)
        except TypeError:
            raise RewardFunctionError(
                f"reward function {name} (--reward_funcs) returned {type(values).__name__}; "
                f"it must return a list of {len(prompts)} numbers, one per completion"
            ) from None
        if len(values) != len(prompts):
            raise RewardFunctionError(
                f"reward function {name} (--reward_funcs) returned {len(values)} rewards for {len(prompts)} completions"
            )
        checked = []
        for i, value in enumerate(values):
            number = _as_float(value)
            if number is None:
                raise RewardFunctionError(
                    f"reward function {name} (--reward_funcs) returned {value!r} for completion {i} of row "
                    f"{sources[i]}: every reward must be a finite number (no None, NaN or inf)"
                )
            checked.append(number)
        return checked

    return reward


def conversational_message(message: dict[str, Any]) -> dict[str, Any]:
    """A canonical message (parts ``{"type", "text"}``) as TRL's conversational message; image parts stay
    placeholders (``{"type": "image"}``), filled with the row's images in order."""
    content = message["content"]
    if isinstance(content, str):
        return {"role": message["role"], "content": [{"type": "text", "text": content}]}
    parts = [
        {"type": "image"} if part["type"] == "image" else {"type": "text", "text": part["text"] or ""}
        for part in content
    ]
    return {"role": message["role"], "content": parts}
