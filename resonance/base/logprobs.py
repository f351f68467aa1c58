"""Log-probabilities of chosen tokens under a model's logits (the value head's and PPO's shared arithmetic)."""

from __future__ import annotations

import torch


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)[token]`` at each position: ``(..., vocab)`` and ``(...)`` -> ``(...)``.

    ``logits[..., i, :]`` must be the prediction of ``tokens[..., i]`` (already shifted). Computed in float32.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
