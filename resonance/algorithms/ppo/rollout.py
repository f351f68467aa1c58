"""PPO's rollout: sampling settings, per-token inputs extended over the response, and the rollout record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resonance.algorithms.ppo.math import (
    masked_whiten,
)

# Generation settings that would make the sampling distribution differ from softmax(logits / temperature); a
# checkpoint's generation_config.json may set them (Qwen's ships top_k=1, top_p=0.001, repetition_penalty=1.05).
PLAIN_SAMPLING = {
    "do_sample": True,
    "num_beams": 1,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}


def extend_per_token_inputs(
    inputs: dict[str, Any], response_length: int, image_inputs: set[str], prefix_lm: bool
) -> dict[str, Any]:
    """The processor's per-token inputs (shaped like ``input_ids`` in their first two dims; not image inputs)
    extended over ``response_length`` generated tokens, as ``generate`` extends them: ``cross_attention_mask``
    repeats the last prompt position, prefix-LM ``token_type_ids`` mark the response causal (1), others get 0."""
    ids = inputs["input_ids"]
    extended = {}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask", "labels") or key in image_inputs:
            continue
        if not (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == ids.shape):
            continue
        if key == "cross_attention_mask":
            tail = value[:, -1:].expand(-1, response_length, *value.shape[2:])
        else:
            fill = 1 if key == "token_type_ids" and prefix_lm else 0
            tail = torch.full((value.shape[0], response_length, *value.shape[2:]), fill, dtype=value.dtype)
        extended[key] = torch.cat([value, tail.to(value.device)], dim=1)
    return extended


@dataclass
class Rollout:
    """One micro-batch of a rollout: sequences (left-padded prompts, then responses) and everything the update
    reads. Response tensors are ``(batch, response_length)``; ``mask`` marks the tokens trained on."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    model_inputs: dict[str, Any]
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    ref_logprobs: torch.Tensor | None  # None with kl_coef 0: no reference is scored
    scores: torch.Tensor
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def response_length(self) -> int:
        return self.mask.shape[1]


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


def whiten_across(
    values: list[torch.Tensor],
    masks: list[torch.Tensor],
    shift_mean: bool,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """:func:`~resonance.algorithms.ppo.math.masked_whiten` over several micro-batches together (responses of different
    lengths), and with ``reduce`` over every process's micro-batches, returned split back as given."""
    mask = _pad_cat([m.long() for m in masks]).bool()
    whitened = masked_whiten(_pad_cat(values), mask, shift_mean, reduce=reduce)
    out, start = [], 0
    for value in values:
        out.append(whitened[start : start + value.shape[0], : value.shape[1]])
        start += value.shape[0]
    return out
