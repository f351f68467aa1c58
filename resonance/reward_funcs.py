"""Reward functions named on the command line (``--reward_funcs pkg.module:function``), shared by GRPO and PPO.

A reward function is called the way TRL calls GRPO reward functions, so one file serves both trainers::

    f(prompts=[conversation], completions=[[{"role": "assistant", "content": text}]],
      completion_ids=[[token ids]], images=[[PIL images]], source=["FILE:LINE"], id=[...], **kwargs)

and returns one finite number per completion. Every call is checked (:func:`checked_reward`), in GRPO (TRL's
``_calculate_rewards``) and PPO alike; each of these is a :class:`RewardFunctionError` naming the function (and the
row, for a value), never a silent zero, a hang or a quiet exit:

* an exception, ``sys.exit()``, or a ``KeyboardInterrupt`` the function raised itself (a Ctrl-C from the user
  still interrupts the run);
* no return within ``--reward_timeout`` seconds (:class:`_Deadline`);
* a wrong count, or a value that is not a number (``None``, a string), not finite (NaN, inf), or larger in
  magnitude than :data:`MAX_ABS_REWARD`. ``True``/``False`` count as 1 and 0, as they do in TRL.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import numbers
import signal
import threading
from collections.abc import Sequence
from dataclasses import field
from types import FrameType
from typing import Any

import numpy as np
import torch

from resonance.errors import ConfigError, RewardFunctionError

logger = logging.getLogger("resonance")

DEFAULT_REWARD_TIMEOUT = 60.0  # seconds per call of one reward function on one batch; 0: no limit

# Rewards are summed, centred and squared in float32 whatever the training dtype (TRL's group advantages, PPO's
# whitening, GAE and value loss). Up to 1e12 every square (<= 4e24) and their sum over a billion response tokens
# stay far inside float32 (3.4e38); a reward of 1e308 becomes inf in float32 and PPO's weights NaN.
MAX_ABS_REWARD = 1e12


def reward_funcs_field(also: str = "") -> Any:
    """The ``--reward_funcs`` flag, for every config that takes it (GRPO, PPO): one definition, one help text."""
    return field(
        default=None,
        metadata={
            "help": "Comma list of reward functions as importable 'module:function' names, e.g. "
            "'my_rewards:exact_match'; their values are summed. Each is called as TRL calls GRPO reward functions: "
            "f(prompts=..., completions=..., completion_ids=..., images=..., source=..., id=..., **kwargs) and "
            f"returns one finite number per completion (|value| <= {MAX_ABS_REWARD:g}; True/False count as 1/0)." + also
        },
    )


def reward_timeout_field() -> Any:
    """The ``--reward_timeout`` flag (GRPO, PPO): one definition; check it with :func:`check_reward_timeout`."""
    return field(
        default=DEFAULT_REWARD_TIMEOUT,
        metadata={
            "help": "Seconds one call of a reward function (one batch) may take before the run fails with an "
            "error naming it; 0 means no limit."
        },
    )


def check_reward_timeout(seconds: float) -> None:
    """Refuse a ``--reward_timeout`` that is negative or not finite (``0`` is the way to say "no limit")."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"--reward_timeout must be a number of seconds >= 0 (0: no limit), got {seconds}")


def load_reward_funcs(names: str | None, timeout: float = DEFAULT_REWARD_TIMEOUT) -> list[Any]:
    """``"a.b:f,c:g"`` -> the functions, each wrapped by :func:`checked_reward` with ``timeout`` seconds per call.
    Errors name ``--reward_funcs``."""
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
        funcs.append(checked_reward(func, name, timeout))
    if not funcs:
        raise RewardFunctionError("--reward_funcs names no function")
    return funcs


def ensure_checked(funcs: Sequence[Any], timeout: float = DEFAULT_REWARD_TIMEOUT) -> list[Any]:
    """``funcs`` with every plain Python function wrapped by :func:`checked_reward` (named ``module:qualname``);
    checked ones, reward models (``nn.Module``), model names (``str``) and async functions (TRL runs those on
    its own event loop) as they are. For trainers built directly with functions rather than from
    ``--reward_funcs``."""
    checked = []
    for func in funcs:
        as_is = isinstance(func, str | torch.nn.Module) or inspect.iscoroutinefunction(func)
        if as_is or hasattr(func, "reward_name"):
            checked.append(func)
        else:
            checked.append(checked_reward(func, f"{func.__module__}:{getattr(func, '__qualname__', func)}", timeout))
    return checked


# ------------------------------------------------------------------------------------------------ one call


class _Deadline(BaseException):
    """Raised inside a reward function whose time is up. A ``BaseException``, like ``KeyboardInterrupt``, so
    that the function's own ``except Exception`` does not swallow it."""


# How the watchdog thread reaches the main thread. A signal, because only a signal interrupts a blocking call
# (time.sleep, a socket read, a lock) and pure-Python loops alike, in the thread that runs the function; sent by
# a thread (not signal.setitimer/alarm) because reward functions set alarms of their own (math_verify, which
# TRL's accuracy_reward calls, uses signal.alarm, whose alarm(0) would cancel ours). SIGURG because nothing in
# this stack uses it (SIGUSR1/2 are SLURM's and submitit's) and its default action is to ignore it, so one
# arriving after the call has ended is harmless. None where the platform has neither (the timeout is then off).
_DEADLINE_SIGNAL = getattr(signal, "SIGURG", None) if hasattr(signal, "pthread_kill") else None
_RESEND_SECONDS = 1.0  # the signal is sent again while the function, having caught it, still runs


@functools.cache
def _warn_timeout_off(reason: str) -> None:
    logger.warning("--reward_timeout is not enforced: %s", reason)


class _CallGuard:
    """One reward function call in the main thread: a deadline of ``seconds`` (0: none), and a Ctrl-C told
    apart from a ``KeyboardInterrupt`` the function raised itself. After the call, ``timed_out`` says the
    deadline passed (even when the function caught :class:`_Deadline` and returned late) and ``interrupted``
    that SIGINT arrived.

    Python runs signal handlers in the main thread only, which is where TRL's ``_calculate_rewards`` and PPO's
    scoring call reward functions. Elsewhere the call runs without a deadline (a warning says so); a
    ``KeyboardInterrupt`` there is the function's own, as Ctrl-C reaches the main thread only. A function stuck
    in C code that never releases the GIL or checks for signals cannot be stopped in-process (only a subprocess
    could, at the cost of pickling every argument and losing the function's state between calls).
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.timed_out = False
        self.interrupted = False
        self._ended = False
        self._done = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _CallGuard:
        if threading.current_thread() is not threading.main_thread():
            if self.seconds:
                _warn_timeout_off("reward functions are called outside the main thread")
            return self
        if callable(signal.getsignal(signal.SIGINT)):  # ignored (SIG_IGN) or fatal (SIG_DFL): nothing to tell apart
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        if self.seconds and _DEADLINE_SIGNAL is None:
            _warn_timeout_off("this platform cannot signal a thread")
        elif self.seconds:
            self._previous[_DEADLINE_SIGNAL] = signal.signal(_DEADLINE_SIGNAL, self._on_deadline)
            self._watchdog = threading.Thread(
                target=self._watch, args=(threading.get_ident(),), name="reward-timeout", daemon=True
            )
            self._watchdog.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._ended = True  # first, and no call before it: from here on the deadline handler raises nothing
        self._done.set()
        if self._watchdog is not None:
            self._watchdog.join()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _watch(self, main_thread: int) -> None:
        if self._done.wait(self.seconds):
            return
        self.timed_out = True
        while not self._done.is_set():
            signal.pthread_kill(main_thread, _DEADLINE_SIGNAL)
            self._done.wait(_RESEND_SECONDS)

    def _on_deadline(self, signum: int, frame: FrameType | None) -> None:
        if self.timed_out and not self._ended:
            raise _Deadline

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True
        self._previous[signal.SIGINT](signum, frame)  # Python's default handler raises KeyboardInterrupt


def _as_float(value: Any) -> float | None:
    """A finite reward as a float (``True``/``False`` as 1/0, one-element tensors and numpy scalars as their
    value), or None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.ndarray | np.generic) and np.size(value) == 1:
        value = value.item()
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def checked_reward(func: Any, name: str, timeout: float = DEFAULT_REWARD_TIMEOUT) -> Any:
    """``func`` with its calls checked (see the module docstring), each given ``timeout`` seconds (0: no limit);
    keeps its ``__name__`` (TRL logs ``rewards/<name>/mean``) and records ``name`` as ``reward_name``."""
    what = f"reward function {name} (--reward_funcs)"

    @functools.wraps(func)
    def reward(*, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        sources = kwargs.get("source") or ["<row>"] * len(prompts)
        rows = f"(batch rows {sorted(set(sources))})"
        guard = _CallGuard(timeout)
        try:
            with guard:
                values = func(prompts=prompts, completions=completions, **kwargs)
        except BaseException as exc:
            if guard.interrupted:
                raise  # the user's Ctrl-C: the run stops as for any other (exit 130)
            if guard.timed_out:
                raise _timeout_error(what, timeout, rows) from None
            if isinstance(exc, SystemExit):
                code = "" if exc.code is None else repr(exc.code)
                raise RewardFunctionError(
                    f"{what} called sys.exit({code}) {rows}: a reward function must return its rewards, not end the run"
                ) from None
            if isinstance(exc, KeyboardInterrupt):
                raise RewardFunctionError(
                    f"{what} raised KeyboardInterrupt itself (no Ctrl-C was pressed) {rows}"
                ) from None
            raise RewardFunctionError(f"{what} raised {type(exc).__name__}: {exc} {rows}") from exc
        if guard.interrupted:  # the function caught the user's Ctrl-C and returned
            raise KeyboardInterrupt
        if guard.timed_out:  # the function caught _Deadline and returned late
            raise _timeout_error(what, timeout, rows)
        return checked_values(values, what, sources)

    reward.reward_name = name
    return reward


def _timeout_error(what: str, timeout: float, rows: str) -> RewardFunctionError:
    return RewardFunctionError(
        f"{what} did not return within {timeout:g} s {rows}: make it faster, or raise --reward_timeout "
        f"(now {timeout:g}; 0 means no limit)"
    )


def checked_values(values: Any, what: str, sources: list[str]) -> list[float]:
    """One finite float per completion, each within :data:`MAX_ABS_REWARD`, or a :class:`RewardFunctionError`."""
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    try:
        values = list(values)
    except TypeError:
        raise RewardFunctionError(
            f"{what} returned {type(values).__name__}; it must return a list of {len(sources)} numbers, one per "
            "completion"
        ) from None
    if len(values) != len(sources):
        raise RewardFunctionError(f"{what} returned {len(values)} rewards for {len(sources)} completions")
    checked = []
    for i, value in enumerate(values):
        number = _as_float(value)
        if number is None:
            raise RewardFunctionError(
                f"{what} returned {value!r} for completion {i} of row {sources[i]}: every reward must be a finite "
                "number (no None, NaN or inf)"
            )
        if abs(number) > MAX_ABS_REWARD:
            raise RewardFunctionError(
                f"{what} returned {value!r} for completion {i} of row {sources[i]}: rewards must lie within "
                f"+-{MAX_ABS_REWARD:g} (the training statistics are float32 and would overflow); scale it down"
            )
        checked.append(number)
    return checked


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
