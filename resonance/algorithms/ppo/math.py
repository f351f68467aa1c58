"""The arithmetic of PPO on token sequences: masked statistics, KL estimators, GAE and the clipped losses.

Pure torch, no model code. Tensors are ``(batch, response_length)`` unless said otherwise; ``mask`` marks the
real response tokens (1/True) and the padding (0/False). Responses are right-padded: each row's tokens come
first, then its padding. Masked positions never contribute to a result, even where they hold ``nan`` or
``inf`` (they are selected away with ``torch.where``, not multiplied by 0), and functions that return
per-token tensors return 0 there. An empty mask (no tokens at all, or a row without tokens for per-row
results) gives 0, not ``nan``: a batch of empty responses contributes no loss and no gradient.

Notation: ``m_t`` the mask, ``n = sum_t m_t``; ``log pi`` the policy's log-probabilities of the sampled
tokens, ``log pi_old`` those at rollout time, ``log pi_ref`` the reference model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def _bool(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match values {tuple(like.shape)}")
    return mask.to(device=like.device, dtype=torch.bool)


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` with every masked position set to 0 (``nan``/``inf`` there included)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum_t m_t x_t`` over all positions, or along ``dim``."""
    mask = _bool(mask, values)
    masked = _masked(values, mask)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``mean = sum_t m_t x_t / sum_t m_t`` over all positions, or along ``dim`` (one per row); 0 where n = 0."""
    mask = _bool(mask, values)
    total = masked_sum(values, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the unmasked values (all positions together).

    ``var = sum_t m_t (x_t - mean)^2 / n``, times ``n / (n - 1)`` (Bessel's correction) when ``unbiased``
    and ``n > 1``. A single value has variance 0; no value at all gives 0.
    """
    mask = _bool(mask, values)
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise the unmasked values over the whole batch: ``(x - mean) / sqrt(var + eps)``.

    ``mean`` and ``var`` are :func:`masked_mean` and the unbiased :func:`masked_var` of the unmasked values.
    With ``shift_mean=False`` the mean is added back, ``(x - mean) / sqrt(var + eps) + mean``: the values are
    rescaled to unit variance but keep their mean (used for rewards, whose sign carries meaning). Masked
    positions are 0.

    ``reduce`` (several processes): sums a tensor over all processes; ``mean`` and ``var`` are then those of
    every process's unmasked values together (the same two-pass formulas), so each process whitens its share
    of one global batch.

    The statistics and the whitening are computed in float64 and returned in ``values``' dtype: in float32 the
    rounding of the mean of large rewards (1e12 over 64k tokens: about 1e4) would swamp the unit-variance values
    that ``shift_mean=False`` adds it back to, and their squares overflow from about 1e19.
    """
    mask = _bool(mask, values)
    wide = values.double()
    if reduce is None:
        mean, var = masked_mean(wide, mask), masked_var(wide, mask)
    else:
        sums = reduce(torch.stack([masked_sum(wide, mask), mask.sum().to(wide.dtype)]))
        count = sums[1]
        mean = sums[0] / count.clamp(min=1)
        var = reduce(masked_sum((wide - mean) ** 2, mask)) / count.clamp(min=1)
        var = var * count / (count - 1) if count > 1 else var
    whitened = (wide - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _masked(whitened.to(values.dtype), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``H = -sum_v p_v log p_v`` with ``p = softmax(logits)``, per position: ``(..., vocab)`` -> ``(...)``.

    A logit of ``-inf`` (a suppressed token) has ``p = 0`` and contributes 0 (``0 log 0 = 0``)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi`` (Schulman's k1, k2, k3).

    With ``d = log pi - log pi_ref`` (the log ratio) and ``r = pi_ref / pi = exp(-d)``:

    - ``k1 = d`` (unbiased, can be negative),
    - ``k2 = d^2 / 2`` (biased, >= 0, low variance),
    - ``k3 = (r - 1) - log r = exp(-d) - 1 + d`` (unbiased, >= 0).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} do not match ref_logprobs {tuple(ref_logprobs.shape)}")
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}: expected 'k1', 'k2' or 'k3'")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last unmasked position, ``(batch,)``; -1 for a row with no unmasked position."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1))
    return last.max(dim=-1).values


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
    kind: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``r_t = -kl_coef * k_t``, plus the sequence score on the row's last response token.

    ``r_t = m_t * (-kl_coef * k_t + [t = T] * score)`` where ``k_t`` is :func:`kl_estimate` of kind ``kind`` and
    ``T`` the last unmasked position of the row. Returns ``(rewards, kl)``, both 0 at masked positions. A row
    without response tokens gets no reward at all (its score has no token to land on). ``ref_logprobs`` None (no
    reference, ``kl_coef`` 0): ``k_t`` is 0.
    """
    mask = _bool(mask, logprobs)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)}: expected one per row, ({logprobs.shape[0]},)")
    if ref_logprobs is None:
        if kl_coef != 0:
            raise ValueError(f"kl_coef {kl_coef} needs the reference's log-probs; got None")
        kl = torch.zeros_like(logprobs)
    else:
        kl = _masked(kl_estimate(logprobs, ref_logprobs, kind), mask)
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_tokens = last >= 0
    rewards[rows[has_tokens], last[has_tokens]] += scores.to(rewards)[has_tokens]
    return rewards, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses; returns ``(advantages, returns)``.

    For each row, with ``T`` its last response token and ``V_{T+1} = 0`` (the episode ends there)::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}        (A_{T+1} = 0)
        R_t     = A_t + V_t                              (the value targets)

    Padding (``m_t = 0``) is neither a reward, a bootstrap value nor a step of the recursion; ``A`` and ``R``
    are 0 there. Raises ``ValueError`` when a row's mask is not right-padded (a 0 followed by a 1).
    """
    mask = _bool(mask, rewards)
    if values.shape != rewards.shape:
        raise ValueError(f"values {tuple(values.shape)} do not match rewards {tuple(rewards.shape)}")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("compute_gae: the response mask must be right-padded (tokens first, then padding)")
    rewards = _masked(rewards, mask)
    values = _masked(values, mask)
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])  # 0 on padding
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = _masked(delta + gamma * lam * next_advantage, mask[:, t])
        advantages[:, t] = next_advantage
    returns = _masked(advantages + values, mask)
    return advantages, returns


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, averaged over all response tokens of the batch.

    ``rho_t = exp(log pi_t - log pi_old_t)``;
    ``loss = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))`` (masked mean, ``eps = clip_range``).
    Metrics (detached): ``clip_fraction`` = share of tokens where the clipped term is the larger one
    (strictly), ``approx_kl = mean_t (log pi_t - log pi_old_t)^2 / 2`` and ``ratio`` = mean ``rho``.
    """
    mask = _bool(mask, logprobs)
    advantages = _masked(advantages, mask)  # padding can hold anything; keep it out of the gradient too
    log_ratio = _masked(logprobs - old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    metrics = {
        "clip_fraction": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
        "ratio": masked_mean(ratio.detach(), mask),
    }
    return loss, metrics


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss, averaged over all response tokens of the batch.

    ``V^clip_t = V_old_t + clip(V_t - V_old_t, -eps, eps)`` (``eps = clip_range_value``);
    ``loss = 0.5 * mean_t max((V_t - R_t)^2, (V^clip_t - R_t)^2)`` (masked mean).
    Metrics (detached): ``value_clip_fraction`` = share of tokens where the clipped error is the larger one
    (strictly), ``value_error = mean_t (V_t - R_t)^2``.
    """
    mask = _bool(mask, values)
    old_values, returns = _masked(old_values, mask), _masked(returns, mask)  # keep padding out of the gradient
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    metrics = {
        "value_clip_fraction": masked_mean((clipped_error > unclipped_error).float(), mask).detach(),
        "value_error": masked_mean(unclipped_error.detach(), mask),
    }
    return loss, metrics
