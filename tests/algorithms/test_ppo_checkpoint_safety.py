"""PPO checkpoints run no code on resume (a crafted ``ppo_state.pt`` is refused, its payload never runs), and a
checkpoint that cannot be written stops the run with the weights kept elsewhere."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import REWARDS, train_argv, write_data

from resonance.algorithms.ppo.checkpoint import CHECKPOINT_STATE, PPOCheckpointing
from resonance.commands.train import main


class Payload:
    """Unpickling this opens (creates) ``marker`` for writing: code a checkpoint must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _argv(tmp_path: Path, ckpt: Path, out: Path, **flags: object) -> list[str]:
    data = write_data(tmp_path, "prompt")
    return train_argv("ppo", ckpt, data, out, reward_funcs=f"{REWARDS}:constant_reward", save_strategy="steps", **flags)


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    return line[line.index("error: ") :]


@pytest.mark.parametrize("crafted", ["payload", "truncated"])
def test_crafted_or_broken_state_is_refused_without_running(
    crafted: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, out, marker = tiny_checkpoint("qwen2_vl"), tmp_path / "out", tmp_path / "pwned"
    assert main("ppo", _argv(tmp_path, ckpt, out, max_steps=1, save_steps=1)) == 0
    state = out / "checkpoint-1" / CHECKPOINT_STATE
    if crafted == "payload":  # the optimizer state swapped for an object whose unpickling writes a file
        original = torch.load(state, weights_only=False)
        torch.save({**original, "optimizer": Payload(marker)}, state)
    else:
        state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()

    assert main("ppo", _argv(tmp_path, ckpt, out, max_steps=2, save_steps=1, resume_from_checkpoint="true")) == 2
    message = _error(capsys)
    assert message.startswith(f"error: {state}: does not load safely as a PPO checkpoint state")
    assert not marker.exists()
    assert not (out / "checkpoint-2").exists()


def test_checkpoint_write_failure_keeps_the_weights(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(self: PPOCheckpointing, folder: Path) -> None:
        (folder / "half-written").parent.mkdir(parents=True)
        (folder / "half-written").write_text("")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PPOCheckpointing, "_write_checkpoint", full)
    out = tmp_path / "out"
    assert main("ppo", _argv(tmp_path, tiny_checkpoint("qwen2_vl"), out, max_steps=1, save_steps=1)) == 1
    message = _error(capsys)
    assert f"step 1: checkpoint {out / 'checkpoint-1'}: could not be saved (No space left on device)" in message
    kept = Path(message.split("the trained weights were kept in ")[1])
    assert kept.parent == tmp_path
    assert {"adapter_model.safetensors", "trainer_state.json"} <= {p.name for p in kept.iterdir()}
    assert not (out / "checkpoint-1").exists() and not (out / ".partial").exists()
