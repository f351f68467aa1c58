"""Reward functions for the GRPO and PPO tests, named on the command line as ``helpers.rewards:NAME``
(:data:`REWARDS`): tests/ is on sys.path in the test process (pyproject's pytest ``pythonpath``) and on PYTHONPATH
for the CLI subprocess (``helpers.cli.run_resonance``)."""

from __future__ import annotations

from typing import Any

REWARDS = __name__  # "helpers.rewards": the module part of --reward_funcs
TARGET = {"id": -1}  # the token the learning tests reward; each sets it first


def share_of_target(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any
) -> list[float]:
    """The share of a completion's tokens that are the target token."""
    return [sum(token == TARGET["id"] for token in ids) / max(len(ids), 1) for ids in completion_ids]


def token_sum_reward(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any
) -> list[float]:
    """Differs between completions (so advantages are not all zero) without favouring anything in particular."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def constant_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [1.0] * len(prompts)


def source_reward(prompts: list[Any], completions: list[Any], source: list[str], images: list[Any], **_: Any):
    """Checks what a reward function receives: the conversational prompt and completion, the row's FILE:LINE and
    its opened images. Rewards the data file's second row."""
    for prompt, completion, row_images in zip(prompts, completions, images, strict=True):
        assert prompt[-1]["role"] == "user" and completion[0]["role"] == "assistant"
        assert isinstance(completion[0]["content"], str) and len(row_images) == 1
    return [float(s.endswith(":2")) for s in source]


def nan_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [0.5] * (len(prompts) - 1) + [float("nan")]


def none_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float | None]:
    return [None] * len(prompts)


def raising_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    raise KeyError("answer")


def short_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [1.0]


NOT_A_FUNCTION = 3


def completion_code(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any
) -> list[float]:
    """A position-weighted sum of a completion's token ids: different completions (almost) never share it, so
    a group's rewards differ whenever its completions do (``token_sum_reward`` % 7 collides one time in seven)."""
    return [float(sum((k + 1) * (token + 1) for k, token in enumerate(ids))) for ids in completion_ids]
