"""Reward functions that hang, exit, interrupt or return values the training math cannot hold, in GRPO and PPO
(:mod:`resonance.reward_funcs`): each ends the run with one :class:`RewardFunctionError` naming the function, never a
hang, a silent exit 0 or NaN weights. A Ctrl-C from the user still interrupts.

The reward functions below are named on the command line as ``<this module>:NAME`` (the module is imported
already, so ``--reward_funcs`` finds it in-process).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import train_argv, write_data

from resonance.algorithms.grpo import VLGRPOConfig
from resonance.algorithms.ppo.config import VLPPOConfig
from resonance.algorithms.ppo.math import masked_whiten
from resonance.algorithms.ppo.rewards import FunctionRewards
from resonance.commands.train import build_trainer, main, parse
from resonance.errors import EXIT_INPUT, ConfigError, RewardFunctionError
from resonance.reward_funcs import DEFAULT_REWARD_TIMEOUT, MAX_ABS_REWARD, checked_reward

HERE = __name__
FOREVER = 3600.0


# ------------------------------------------------------------------------------------ reward functions


def sleeps_forever(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    while True:
        time.sleep(FOREVER)


def spins_forever(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    while True:
        pass


def swallows_exceptions_forever(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    while True:
        try:
            time.sleep(FOREVER)
        except Exception:  # what a careless reward function does
            pass


def returns_late(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    try:
        time.sleep(FOREVER)
    except BaseException:  # catches even the deadline, then answers anyway
        pass
    return [1.0] * len(prompts)


def exits_zero(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    sys.exit(0)


def raises_keyboard_interrupt(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    raise KeyboardInterrupt


def huge(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [1e308] * len(prompts)


def at_the_bound(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any):
    """+-MAX_ABS_REWARD by position, so a batch's rewards differ (whitening and advantages have work to do)."""
    return [MAX_ABS_REWARD if i % 2 else -MAX_ABS_REWARD for i in range(len(completion_ids))]


def _call(func: Callable[..., Any], timeout: float = DEFAULT_REWARD_TIMEOUT, n: int = 2) -> list[float]:
    wrapped = checked_reward(func, f"{HERE}:{func.__name__}", timeout)
    return wrapped(prompts=[[]] * n, completions=[[]] * n, source=[f"p.jsonl:{i + 1}" for i in range(n)])


# ------------------------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("func", [sleeps_forever, spins_forever, swallows_exceptions_forever, returns_late])
def test_hung_function_fails_at_its_timeout(func: Callable[..., Any]) -> None:
    """Blocked in a system call, spinning in Python, swallowing every Exception, or catching the deadline and
    answering late: each is stopped and named, with the time limit and the flag."""
    with pytest.raises(RewardFunctionError) as info:
        _call(func, timeout=0.2)
    message = str(info.value)
    assert f"reward function {HERE}:{func.__name__} (--reward_funcs) did not return within 0.2 s" in message
    assert "raise --reward_timeout (now 0.2; 0 means no limit)" in message
    assert info.value.exit_code == EXIT_INPUT


def test_zero_timeout_starts_no_watchdog() -> None:
    def watched(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return [float(any(t.name == "reward-timeout" for t in threading.enumerate()))] * len(prompts)

    assert _call(watched, timeout=5) == [1.0, 1.0]
    assert _call(watched, timeout=0) == [0.0, 0.0]


def test_signal_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGURG)
    assert _call(lambda prompts, completions, **_: [0.0, 1.0], timeout=5) == [0.0, 1.0]
    with pytest.raises(RewardFunctionError):
        _call(sleeps_forever, timeout=0.1)
    with pytest.raises(RewardFunctionError):
        _call(exits_zero)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGURG)) == before


def test_outside_the_main_thread_runs_unguarded_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Signals reach the main thread only: elsewhere the call still runs and is checked, and a warning says the
    timeout is off (``signal.signal`` from another thread would raise ValueError)."""
    results: list[Any] = []

    def run() -> None:
        try:
            results.append(_call(lambda prompts, completions, **_: [2.0, 3.0], timeout=5))
        except Exception as exc:  # handed to the main thread's assertion
            results.append(exc)

    with caplog.at_level(logging.WARNING, logger="resonance"):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    assert results == [[2.0, 3.0]]
    assert "--reward_timeout is not enforced: reward functions are called outside the main thread" in caplog.text


@pytest.mark.parametrize("config_class", [VLGRPOConfig, VLPPOConfig])
def test_reward_timeout_flag(config_class: type, tmp_path: Path) -> None:
    """One --reward_timeout on both trainers: 60 s by default, 0 for no limit, never negative or NaN."""
    kwargs = {"output_dir": str(tmp_path), "reward_funcs": "x:y", "bf16": False, "report_to": "none"}
    assert config_class(**kwargs).reward_timeout == DEFAULT_REWARD_TIMEOUT == 60
    assert config_class(**kwargs, reward_timeout=0).reward_timeout == 0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"--reward_timeout must be a number of seconds >= 0 \(0: no limit\)"):
            config_class(**kwargs, reward_timeout=bad)


# ------------------------------------------------------------------------------- exits and interrupts


@pytest.mark.parametrize(
    ("code", "shown"), [(0, "sys.exit(0)"), ("bye", "sys.exit('bye')"), (None, "sys.exit()")], ids=str
)
def test_sys_exit_fails_the_run(code: object, shown: str) -> None:
    def exits(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        sys.exit(code)

    with pytest.raises(RewardFunctionError) as info:
        _call(exits)
    assert f"(--reward_funcs) called {shown} (batch rows ['p.jsonl:1', 'p.jsonl:2'])" in str(info.value)
    assert info.value.exit_code == EXIT_INPUT


def test_own_keyboard_interrupt_fails_the_run() -> None:
    with pytest.raises(RewardFunctionError, match="raised KeyboardInterrupt itself \\(no Ctrl-C was pressed\\)"):
        _call(raises_keyboard_interrupt)


@pytest.fixture
def interactive_sigint():
    """SIGINT as an interactive run has it (Python's handler, which raises KeyboardInterrupt), whatever the
    disposition the suite inherited: a suite started as a background job has SIGINT ignored, and Ctrl-C cannot
    reach it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("swallow", [False, True], ids=["propagates", "caught by the function"])
def test_ctrl_c_still_interrupts(swallow: bool, interactive_sigint: None) -> None:
    """A real SIGINT during the call is the user's Ctrl-C: KeyboardInterrupt (exit 130 from the CLI), even when
    the function catches it and returns."""

    def interrupted(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(FOREVER)
        except KeyboardInterrupt:
            if not swallow:
                raise
        return [0.0] * len(prompts)

    with pytest.raises(KeyboardInterrupt):
        _call(interrupted, timeout=30)


def test_ignored_sigint_stays_ignored() -> None:
    """Where SIGINT is ignored (a background job), one arriving during the call interrupts nothing."""

    def signalled(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the signal arrives, and is ignored
        return [4.0] * len(prompts)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert _call(signalled, timeout=30) == [4.0, 4.0]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, 1e308], r"returned 1e\+308 for completion 1 of row p.jsonl:2: rewards must lie within \+-1e\+12"),
        ([-2 * MAX_ABS_REWARD, 0], r"returned -2000000000000.0 for completion 0 of row p.jsonl:1: .*within \+-1e\+12"),
        ([1.0, "1.0"], r"returned '1.0' for completion 1 of row p.jsonl:2: every reward must be a finite number"),
        ([float("inf"), 1.0], r"returned inf for completion 0 of row p.jsonl:1"),
        ([1.0], r"returned 1 rewards for 2 completions"),
    ],
)
def test_bad_values(values: list[Any], message: str) -> None:
    with pytest.raises(RewardFunctionError, match=message):
        _call(lambda prompts, completions, **_: values)


def test_accepted_values() -> None:
    """Booleans count as 1 and 0 (as in TRL); numpy scalars, one-element tensors and the bound itself pass."""
    values = [True, False, np.float32(0.5), np.bool_(True), torch.tensor([2.0]), -MAX_ABS_REWARD]
    assert _call(lambda prompts, completions, **_: values, n=6) == [1.0, 0.0, 0.5, 1.0, 2.0, -MAX_ABS_REWARD]


def test_functions_passed_to_the_trainer_directly_are_checked() -> None:
    """PPO's FunctionRewards wraps a plain function (library use, not --reward_funcs) with the same checks."""
    rewards = FunctionRewards([huge], timeout=5)
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "source": "p.jsonl:7"}]
    with pytest.raises(RewardFunctionError, match=rf"{HERE}:huge \(--reward_funcs\) returned 1e\+308 .* p.jsonl:7"):
        rewards(rows, ["Hello"], [[5]], [[]])


# ----------------------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
@pytest.mark.parametrize(
    ("reward", "flags", "message"),
    [
        ("sleeps_forever", {"reward_timeout": 1}, "did not return within 1 s"),
        ("exits_zero", {}, "called sys.exit(0)"),
        ("huge", {}, "returned 1e+308 for completion 0 of row"),
    ],
)
def test_run_fails_with_one_line(
    algorithm: str,
    reward: str,
    flags: dict[str, Any],
    message: str,
    tmp_path: Path,
    tiny_checkpoint: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``resonance train grpo|ppo``: exit 2 and one error line naming the function, where before the run hung,
    exited 0 with nothing saved, or trained on inf (PPO: NaN weights)."""
    output_dir = tmp_path / "out"
    data = write_data(tmp_path, "prompt")
    # No progress bar: TRL's would leave its line open, with the error printed after it on the same line.
    flags = {"reward_funcs": f"{HERE}:{reward}", "disable_tqdm": True, **flags}
    assert main(algorithm, train_argv(algorithm, tiny_checkpoint("llava"), data, output_dir, **flags)) == EXIT_INPUT
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert f"error: reward function {HERE}:{reward} (--reward_funcs) " in errors[0] and message in errors[0]
    assert not (output_dir / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rewards_at_the_bound_train_finite(
    algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """The largest rewards accepted (+-MAX_ABS_REWARD) train: every logged statistic and every weight stays finite
    and weights move. (At +-1e19 GRPO's reward_std and PPO's value loss are already inf.)"""
    argv = train_argv(
        algorithm,
        tiny_checkpoint("llava"),
        write_data(tmp_path, "prompt"),
        tmp_path / "out",
        reward_funcs=f"{HERE}:at_the_bound",
    )
    trainer, _ = build_trainer(algorithm, *parse(algorithm, argv))
    model = trainer.policy if algorithm == "ppo" else trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    logged = trainer.log_history if algorithm == "ppo" else trainer.state.log_history
    numbers = {k: v for entry in logged for k, v in entry.items() if isinstance(v, float)}
    assert numbers and all(math.isfinite(v) for v in numbers.values()), numbers
    trained = dict(model.named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in before.items()), "no weight moved: nothing was tested"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("shift_mean", [False, True])
def test_whitening_holds_rewards_at_the_bound(shift_mean: bool) -> None:
    """PPO's whitening of +-MAX_ABS_REWARD over 64k float32 tokens gives +-1, with and without the mean kept (with
    float32 statistics the rounded mean, about 8e3, is added back to every reward: ``shift_mean=False``)."""
    rewards = torch.full((16, 4096), MAX_ABS_REWARD)
    rewards[::2] = -MAX_ABS_REWARD
    whitened = masked_whiten(rewards, torch.ones_like(rewards, dtype=torch.bool), shift_mean=shift_mean)
    torch.testing.assert_close(whitened, rewards / MAX_ABS_REWARD, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ reward models (PPO)


class _ScoringModel(torch.nn.Module):
    """A reward model whose scores are given: only what ModelRewards calls (``.model`` for the device, forward)."""

    def __init__(self, scores: list[float]):
        super().__init__()
        self.model = torch.nn.Linear(1, 1)
        self.scores = torch.tensor(scores, dtype=torch.float16)

    def forward(self, **batch: Any) -> torch.Tensor:
        return self.scores


@pytest.mark.parametrize(("scores", "expected"), [([1.0, float("nan")], "nan"), ([1.0, 65504.0 * 2], "inf")])
def test_reward_model_scores_pass_the_checks_reward_functions_pass(scores: list[float], expected: str) -> None:
    """Before: a reward model's NaN or overflowed half-precision score went straight into PPO's advantages."""
    from resonance.algorithms.ppo.rewards import ModelRewards

    rewards = ModelRewards(_ScoringModel(scores), collator=lambda features: {}, name="out/rm")
    rows = [{"prompt": [], "source": "prompts.jsonl:1"}, {"prompt": [], "source": "prompts.jsonl:2"}]
    with pytest.raises(RewardFunctionError, match=f"reward model out/rm \\(--reward_model_path\\) returned {expected}"):
        rewards(rows, ["a", "b"], [[1], [2]], [[], []])


def test_reward_model_scores_that_pass_are_returned_as_float32() -> None:
    from resonance.algorithms.ppo.rewards import ModelRewards

    rewards = ModelRewards(_ScoringModel([0.5, -2.0]), collator=lambda features: {}, name="out/rm")
    rows = [{"prompt": [], "source": "p:1"}, {"prompt": [], "source": "p:2"}]
    scores = rewards(rows, ["a", "b"], [[1], [2]], [[], []])
    assert scores.dtype == torch.float32 and scores.tolist() == [0.5, -2.0]
