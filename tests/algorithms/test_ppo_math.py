"""resonance.algorithms.ppo.math against values worked out by hand (in the comments), and its edge cases.

Every expected number below is computed on paper from the formula in the function's docstring; a flipped
sign, a shifted index or a leak from padding changes at least one of them.
"""

from __future__ import annotations

import math

import pytest
import torch

from resonance.algorithms.ppo.math import (
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    kl_estimate,
    kl_penalized_rewards,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from resonance.base.logprobs import token_log_probs

NAN = float("nan")


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=atol)


# -- masked statistics -----------------------------------------------------------------------------


def test_masked_mean_and_sum() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_sum(values, mask), 7.0)  # 1 + 2 + 4
    close(masked_mean(values, mask), 7.0 / 3)  # (1 + 2 + 4) / 3, not the mean of row means (1.5 + 4) / 2
    close(masked_mean(values, mask, dim=1), [1.5, 4.0])
    close(masked_mean(values, mask, dim=0), [2.5, 2.0, 0.0])  # column 2 has no token


def test_masked_mean_empty_rows_and_nan_padding() -> None:
    values = torch.tensor([[1.0, 2.0], [NAN, math.inf]])
    mask = torch.tensor([[True, True], [False, False]])
    close(masked_mean(values, mask, dim=1), [1.5, 0.0])  # an empty row gives 0, and nan/inf padding never leaks
    close(masked_mean(values, mask), 1.5)
    close(masked_mean(values, torch.zeros(2, 2)), 0.0)  # nothing at all: 0, not nan
    with pytest.raises(ValueError, match="does not match"):
        masked_mean(values, mask[:, :1])


def test_masked_var() -> None:
    values = torch.tensor([[1.0, 2.0, 100.0], [4.0, NAN, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # unmasked 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9
    close(masked_var(values, mask, unbiased=False), 42 / 9 / 3)  # 14/9
    close(masked_var(values, mask), 42 / 9 / 2)  # Bessel: 7/3
    close(masked_var(torch.tensor([[5.0, 9.0]]), torch.tensor([[1, 0]])), 0.0)  # one value: 0
    close(masked_var(values, torch.zeros(2, 3)), 0.0)


def test_masked_whiten_with_and_without_mean() -> None:
    values = torch.tensor([[1.0, 2.0, 100.0], [4.0, NAN, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    std = math.sqrt(7 / 3)  # mean 7/3, unbiased variance 7/3 (test_masked_var)
    expected = [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]]
    # = [[-0.87287, -0.21822, 0], [1.09109, 0, 0]]
    whitened = masked_whiten(values, mask)
    close(whitened, expected, atol=1e-5)
    close(masked_mean(whitened, mask), 0.0, atol=1e-6)
    close(masked_var(whitened, mask), 1.0, atol=1e-5)
    kept = masked_whiten(values, mask, shift_mean=False)
    shifted = [
        [e + 7 / 3 if m else 0.0 for e, m in zip(row, mrow, strict=True)]
        for row, mrow in zip(expected, mask.tolist(), strict=True)
    ]
    # = [[1.46046, 2.11511, 0], [3.42442, 0, 0]]: unit variance, mean 7/3 kept
    close(kept, shifted, atol=1e-5)
    close(masked_mean(kept, mask), 7 / 3, atol=1e-5)


def test_masked_whiten_single_and_no_token() -> None:
    close(masked_whiten(torch.tensor([[5.0, 3.0]]), torch.tensor([[1, 0]])), [[0.0, 0.0]])
    close(masked_whiten(torch.tensor([[5.0, 3.0]]), torch.tensor([[1, 0]]), shift_mean=False), [[5.0, 0.0]])
    close(masked_whiten(torch.tensor([[5.0, NAN]]), torch.zeros(1, 2)), [[0.0, 0.0]])


# -- log-probabilities -----------------------------------------------------------------------------


def test_token_log_probs_and_entropy() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]])  # softmax: [1/4, 3/4], [3/4, 1/4]
    tokens = torch.tensor([[1, 1]])
    close(token_log_probs(logits, tokens), [[math.log(0.75), math.log(0.25)]])
    # temperature 2: logits [0, ln(3)/2] -> p(1) = sqrt(3) / (1 + sqrt(3))
    close(token_log_probs(logits, tokens, temperature=2.0)[0, 0], math.log(math.sqrt(3) / (1 + math.sqrt(3))))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562335
    close(entropy_from_logits(logits), [[h, h]])
    # a suppressed token (logit -inf) has p = 0 and adds nothing: the same entropy, not nan
    suppressed = torch.cat([logits, torch.full((1, 2, 1), -math.inf)], dim=-1)
    close(entropy_from_logits(suppressed), [[h, h]])
    with pytest.raises(ValueError, match="do not match"):
        token_log_probs(logits, tokens[:, :1])


# -- KL --------------------------------------------------------------------------------------------


def test_kl_estimators_hand_computed() -> None:
    logprobs = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])  # d = log pi - log pi_ref = [0.5, -1.0, 0.0]
    close(kl_estimate(logprobs, ref, "k1"), [0.5, -1.0, 0.0])
    close(kl_estimate(logprobs, ref, "k2"), [0.125, 0.5, 0.0])
    # k3 = exp(-d) - 1 + d: exp(-0.5) - 0.5 = 0.106531; e - 2 = 0.718282; 0
    close(kl_estimate(logprobs, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0])
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logprobs, ref, "k4")  # type: ignore[arg-type]


def test_kl_estimators_direction() -> None:
    """Averaged over tokens drawn from the policy, k1 and k3 give exactly KL(pi || pi_ref), not KL(pi_ref || pi)."""
    pi = torch.tensor([0.7, 0.2, 0.1])
    ref = torch.tensor([0.1, 0.3, 0.6])
    kl = 0.7 * math.log(7) + 0.2 * math.log(2 / 3) + 0.1 * math.log(1 / 6)  # KL(pi || ref) = 1.10187
    reverse = 0.1 * math.log(1 / 7) + 0.3 * math.log(1.5) + 0.6 * math.log(6)  # KL(ref || pi) = 1.00210
    assert abs(kl - reverse) > 0.05
    for kind in ("k1", "k3"):
        expectation = (pi * kl_estimate(pi.log(), ref.log(), kind)).sum()
        close(expectation, kl, atol=1e-5)
    assert (kl_estimate(pi.log(), ref.log(), "k3") >= 0).all()


def test_last_token_index() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]])
    assert last_token_index(mask).tolist() == [1, -1, 2, 0]


def test_kl_penalized_rewards() -> None:
    scores = torch.tensor([2.0, -1.0, 5.0])
    ref = torch.zeros(3, 3)
    logprobs = torch.tensor([[0.5, -1.0, 0.2], [0.3, 9.0, 9.0], [4.0, 4.0, 4.0]])  # = d (ref is 0)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.2], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # -0.1 * d, and the score on the last response token: row 0 at t=2, row 1 (one token) at t=0, row 2 none
    close(rewards, [[-0.05, 0.1, -0.02 + 2.0], [-0.03 - 1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1, kind="k2")
    close(kl, [[0.125, 0.5, 0.02], [0.045, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(rewards, [[-0.0125, -0.05, -0.002 + 2.0], [-0.0045 - 1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="one per row"):
        kl_penalized_rewards(scores[:2], logprobs, ref, mask, kl_coef=0.1)


def test_kl_penalized_rewards_without_a_reference() -> None:
    """kl_coef 0 reads no reference: its rewards are those with any reference at weight 0, the KL is 0; a weight
    other than 0 without the reference's log-probs is refused."""
    scores = torch.tensor([2.0, -1.0, 5.0])
    logprobs = torch.tensor([[0.5, -1.0, 0.2], [0.3, 9.0, 9.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    with_ref, _ = kl_penalized_rewards(scores, logprobs, torch.randn(3, 3), mask, kl_coef=0.0)
    rewards, kl = kl_penalized_rewards(scores, logprobs, None, mask, kl_coef=0.0)
    close(rewards, [[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(rewards, with_ref) and not kl.any()
    with pytest.raises(ValueError, match="needs the reference"):
        kl_penalized_rewards(scores, logprobs, None, mask, kl_coef=0.1)


# -- GAE -------------------------------------------------------------------------------------------


def _gae_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0], [3.0, 7.0, 7.0, 7.0], [1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, NAN], [1.0, 9.0, NAN, 9.0], [2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    return rewards, values, mask


def test_gae_hand_computed() -> None:
    rewards, values, mask = _gae_batch()
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)  # gamma * lam = 0.72
    # row 0 (T = 2, V_3 = 0, the padding's value and reward ignored):
    #   t=2: delta = 2 + 0.9*0 - 1.5 = 0.5;   A = 0.5
    #   t=1: delta = 0 + 0.9*1.5 - 1 = 0.35;  A = 0.35 + 0.72*0.5 = 0.71
    #   t=0: delta = 1 + 0.9*1 - 0.5 = 1.4;   A = 1.4 + 0.72*0.71 = 1.9112
    # row 1 (a single token): A = 3 - 1 = 2; row 2 (no token): 0
    close(advantages, [[1.9112, 0.71, 0.5, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0] * 4], atol=1e-5)
    close(returns, [[2.4112, 1.71, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0] * 4], atol=1e-5)


def test_gae_monte_carlo_and_td_limits() -> None:
    rewards, values, mask = _gae_batch()
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t: 3 - 0.5, 2 - 1, 2 - 1.5
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(advantages[0], [2.5, 1.0, 0.5, 0.0])
    close(returns[0], [3.0, 2.0, 2.0, 0.0])  # the rewards-to-go
    # lam = 0: A_t = delta_t = r_t + V_{t+1} - V_t (gamma 1): 1 + 1 - 0.5, 0 + 1.5 - 1, 2 + 0 - 1.5
    advantages, _ = compute_gae(rewards, values, mask, gamma=1.0, lam=0.0)
    close(advantages[0], [1.5, 0.5, 0.5, 0.0])


def test_gae_padding_never_leaks() -> None:
    rewards, values, mask = _gae_batch()
    base = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    rewards[mask == 0] = 1e6
    values[mask == 0] = -1e6
    for before, after in zip(base, compute_gae(rewards, values, mask, gamma=0.9, lam=0.8), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_gae_refuses_left_padding() -> None:
    rewards, values, _ = _gae_batch()
    with pytest.raises(ValueError, match="right-padded"):
        compute_gae(rewards, values, torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]))


# -- losses ----------------------------------------------------------------------------------------


def test_clipped_policy_loss_hand_computed() -> None:
    ratios = [1.5, 0.5, 1.1, 1.5, 0.7]
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    logprobs = (old + torch.tensor([ratios]).log()).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, 2.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = clipped_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # per token max(-A rho, -A clip(rho, 0.8, 1.2)):
    #   rho 1.5, A  1: max(-1.5, -1.2) = -1.2  (clipped)
    #   rho 0.5, A -1: max( 0.5,  0.8) =  0.8  (clipped)
    #   rho 1.1, A  2: max(-2.2, -2.2) = -2.2
    #   rho 1.5, A -1: max( 1.5,  1.2) =  1.5  (the pessimistic bound keeps the unclipped term)
    #   padding: ignored
    close(loss.detach(), (-1.2 + 0.8 - 2.2 + 1.5) / 4)  # -0.275
    close(metrics["clip_fraction"], 0.5)
    logs = [math.log(r) for r in ratios[:4]]
    close(metrics["approx_kl"], 0.5 * sum(x * x for x in logs) / 4)  # 0.102293
    close(metrics["ratio"], (1.5 + 0.5 + 1.1 + 1.5) / 4)
    loss.backward()
    # d/d log pi of -A rho = -A rho / 4 where unclipped; 0 where the clipped (constant) term wins
    close(logprobs.grad, [[0.0, 0.0, -2.2 / 4, 1.5 / 4, 0.0]])


def test_clipped_policy_loss_on_policy_and_empty() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, NAN]], requires_grad=True)
    advantages = torch.tensor([[2.0, -4.0, NAN]])
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask)
    close(loss.detach(), -(2.0 - 4.0) / 2)  # rho = 1: -mean(A)
    close(metrics["clip_fraction"], 0.0)
    close(metrics["approx_kl"], 0.0)
    loss.backward()
    close(logprobs.grad, [[-1.0, 2.0, 0.0]])  # -A / 2, and no nan from the padding
    loss, metrics = clipped_policy_loss(logprobs, logprobs.detach(), advantages, torch.zeros(1, 3))
    close(loss.detach(), 0.0)
    close(metrics["clip_fraction"], 0.0)


def test_clipped_value_loss_hand_computed() -> None:
    values = torch.tensor([[1.0, 2.0, 0.0, 3.0, 7.0]], requires_grad=True)
    old = torch.tensor([[0.5, 2.5, 0.0, 2.0, NAN]])
    returns = torch.tensor([[2.0, 1.0, 0.5, 2.5, NAN]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # V_clip = old + clip(V - old, -0.2, 0.2); per token max((V - R)^2, (V_clip - R)^2):
    #   V 1, old 0.5 -> 0.7, R 2:   max(1, 1.69)    = 1.69 (clipped)
    #   V 2, old 2.5 -> 2.3, R 1:   max(1, 1.69)    = 1.69 (clipped)
    #   V 0, old 0   -> 0,   R 0.5: max(0.25, 0.25) = 0.25
    #   V 3, old 2   -> 2.2, R 2.5: max(0.25, 0.09) = 0.25
    close(loss.detach(), 0.5 * (1.69 + 1.69 + 0.25 + 0.25) / 4)  # 0.485
    close(metrics["value_clip_fraction"], 0.5)
    close(metrics["value_error"], (1 + 1 + 0.25 + 0.25) / 4)
    loss.backward()
    # 0.5 * 2 (V - R) / 4 where the unclipped error counts, 0 where the clipped one wins
    close(values.grad, [[0.0, 0.0, -0.125, 0.125, 0.0]])


def test_clipped_value_loss_empty_mask() -> None:
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss, metrics = clipped_value_loss(values, torch.zeros(1, 2), torch.full((1, 2), NAN), torch.zeros(1, 2))
    close(loss.detach(), 0.0)
    close(metrics["value_clip_fraction"], 0.0)
    loss.backward()
    close(values.grad, [[0.0, 0.0]])
