"""One exit-code table for every command: 0 ok, 1 a check or run failed, 2 bad input, 3 an internal error."""

from __future__ import annotations

import pytest
import torch

from resonance import cli, codegen
from resonance.errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigError,
    DataError,
    MissingBackendError,
    ResonanceError,
    RowError,
    TrainingError,
    user_error,
)


def test_a_bug_exits_3_with_its_traceback_and_a_line_saying_it_is_not_the_input(monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise RuntimeError("compiler bug")

    monkeypatch.setattr(codegen, "plan", crash)
    assert cli.main(["check"]) == EXIT_INTERNAL
    captured = capsys.readouterr().err
    assert "Traceback" in captured and "RuntimeError: compiler bug" in captured
    assert "internal error" in captured and "not in your input" in captured


def test_a_resonance_error_that_reaches_the_top_is_one_line_with_its_own_code(monkeypatch, capsys):
    def bad_flag(*args, **kwargs):
        raise ConfigError("--batch_size: must be at least 1, got 0")

    monkeypatch.setattr(codegen, "plan", bad_flag)
    assert cli.main(["check"]) == EXIT_INPUT
    captured = capsys.readouterr().err
    assert "Traceback" not in captured
    assert captured.strip() == "error: --batch_size: must be at least 1, got 0"


def test_ctrl_c_exits_130(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(codegen, "plan", interrupted)
    assert cli.main(["check"]) == EXIT_INTERRUPTED


@pytest.mark.parametrize(("argv", "code"), [(["--help"], EXIT_OK), (["no-such-command"], EXIT_INPUT)])
def test_usage_errors_are_bad_input(argv, code):
    assert cli.main(argv) == code


def test_an_error_that_stops_training_starts_its_own_line_after_the_progress_bar(monkeypatch, capsys):
    """Before: TRL's bar was left open, so `error: ...` was written after its carriage return, on the bar's line."""
    import sys

    from tqdm import tqdm

    from resonance.commands import train

    def stops_in_a_step(algorithm, argv):
        bar = tqdm(total=3, file=sys.stderr)
        bar.update(1)
        raise ConfigError("reward function m:f (--reward_funcs) called sys.exit(0)")

    monkeypatch.setattr(train, "parse", stops_in_a_step)
    assert train.main("grpo", []) == EXIT_INPUT
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "error: reward function m:f (--reward_funcs) called sys.exit(0)"
    assert "1/3" in lines[-2] and not list(getattr(tqdm, "_instances", ()))


class _Raising(torch.utils.data.Dataset):
    def __init__(self, error: Exception):
        self.error = error

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> None:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        DataError([("a.jsonl:3", "image: missing"), ("a.jsonl:4", "prompt: empty")], header="2 rows"),  # a RuntimeError
        MissingBackendError("specs/x.yaml: video_processor_class", "AVideoProcessor", "torchvision"),  # one too
        RowError("a.jsonl:2: cannot read image b.png"),  # rebuilt, the worker's traceback as its message
        TrainingError("the loss is nan at step 3"),
    ],
)
def test_an_error_from_a_loader_worker_is_reported_as_raised(error: ResonanceError) -> None:
    loader = torch.utils.data.DataLoader(_Raising(error), batch_size=None, num_workers=1)
    with pytest.raises(Exception) as info:  # noqa: B017 - whatever type torch rebuilds it as
        next(iter(loader))
    assert "DataLoader worker" in str(info.value)
    reported = user_error(info.value)
    assert str(reported) == str(error) and reported.exit_code == error.exit_code


def test_user_error_passes_a_resonance_error_and_refuses_anything_else() -> None:
    error = ConfigError("--x: bad")
    assert user_error(error) is error
    assert user_error(ValueError("Caught KeyError in DataLoader worker process 0.\nOriginal Traceback")) is None
    loader = torch.utils.data.DataLoader(_Raising(KeyError("row")), batch_size=None, num_workers=1)
    with pytest.raises(KeyError) as info:
        next(iter(loader))
    assert user_error(info.value) is None  # a bug in a worker stays a bug
