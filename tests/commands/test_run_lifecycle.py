"""A run's lifecycle through ``resonance train X``: the output folder checked before anything loads, resume (``true``
or a path) for every algorithm to the weights of an uninterrupted run, incomplete checkpoints never picked, a failed
save that keeps the weights, and training stopped when the weights or the loss stop being finite."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from helpers import REWARDS, train_argv, write_data
from safetensors.torch import load_file

from resonance.commands import train
from resonance.commands.train import main

DATA_KIND = {"sft": "sft", "dpo": "dpo", "rm": "rm", "grpo": "prompt", "ppo": "prompt"}
REWARD = {"grpo": f"{REWARDS}:token_sum_reward", "ppo": f"{REWARDS}:token_sum_reward"}


def _argv(algorithm: str, ckpt: Path, data: Path, out: Path, **overrides: object) -> list[str]:
    return train_argv(algorithm, ckpt, data, out, reward_funcs=REWARD.get(algorithm), **overrides)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every safetensors tensor of a saved run (adapter, and rm's or PPO's head), by file and name."""
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``error:`` line the command printed (after any progress bar drawn on the same line of stderr)."""
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    return line[line.index("error: ") :]


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm", "grpo", "ppo"])
def test_resume_true_reaches_the_uninterrupted_weights_past_an_incomplete_checkpoint(
    algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Two steps in one go; then a folder holding only that run's checkpoint-1 (a run killed after step 1), a
    half-written checkpoint-7 (killed mid-write: transformers' get_last_checkpoint would pick it) and a leftover
    staging folder: ``--resume_from_checkpoint true`` resumes from checkpoint-1 and ends on the same weights."""
    ckpt, data = tiny_checkpoint("qwen2_vl"), write_data(tmp_path, DATA_KIND[algorithm])
    flags = {"max_steps": 2, "save_strategy": "steps", "save_steps": 1}
    straight = tmp_path / "straight"
    assert main(algorithm, _argv(algorithm, ckpt, data, straight, **flags)) == 0
    assert sorted(p.name for p in straight.iterdir() if p.name.startswith(("checkpoint", "."))) == [
        "checkpoint-1",
        "checkpoint-2",
    ]  # every checkpoint renamed into place, no staging folder left

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    (resumed / "checkpoint-7").mkdir()
    (resumed / "checkpoint-7" / "adapter_config.json").write_text("{}")
    (resumed / ".partial" / "checkpoint-2").mkdir(parents=True)
    assert main(algorithm, _argv(algorithm, ckpt, data, resumed, **flags, resume_from_checkpoint="true")) == 0
    assert f"{resumed / 'checkpoint-7'}: incomplete" in caplog.text

    state = json.loads((resumed / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    first = json.loads((straight / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    assert state["log_history"][: len(first)] == first  # continued from checkpoint-1, not from the start
    if algorithm == "grpo":
        # TRL's RepeatSampler draws each pass's prompt order from its own generator, seeded once and not saved in
        # checkpoints: the resumed run's step 2 gets other prompts than the uninterrupted run's.
        return
    expected, got = _weights(straight), _weights(resumed)
    assert expected.keys() == got.keys() and expected
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    after_one = _weights(straight / "checkpoint-1")
    assert any(not torch.equal(after_one[name], got[name]) for name in after_one)  # step 2 ran: not trivially equal


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model fails the test: what is checked here is checked before it."""

    def build_trainer(*_: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train, "build_trainer", build_trainer)


def test_resume_errors_before_the_model_loads(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """No checkpoint to resume from, a missing folder, a half-written one, one with nothing left to train: one line
    each, exit 2, before the model loads."""
    ckpt, data, out = tiny_checkpoint("qwen2_vl"), write_data(tmp_path, "sft"), tmp_path / "out"

    def run(resume: str, **flags: object) -> str:
        assert main("sft", train_argv("sft", ckpt, data, out, resume_from_checkpoint=resume, **flags)) == 2
        return capsys.readouterr().err

    assert f"--resume_from_checkpoint true: no complete checkpoint-<step> folder in {out}" in run("true")
    assert str(tmp_path / "gone") in run(str(tmp_path / "gone"))  # a missing folder (the flag checks may say it)
    (out / "checkpoint-3").mkdir(parents=True)
    assert "not a complete checkpoint (no readable trainer_state.json)" in run(str(out / "checkpoint-3"))
    (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    message = run("true", max_steps=3)
    assert "already at step 3, and --max_steps is 3: nothing left to train" in message
    assert "Traceback" not in message


# ------------------------------------------------------------------------------------------------ output folder


def test_output_folder_checked_before_the_model_loads(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    data, ckpt = write_data(tmp_path, "sft"), tiny_checkpoint("qwen2_vl")
    used = tmp_path / "used"
    (used / "checkpoint-4").mkdir(parents=True)
    assert main("sft", train_argv("sft", ckpt, data, used)) == 1
    message = capsys.readouterr().err
    assert f"--output_dir {used}: not empty (checkpoint-4)" in message
    assert "--overwrite_output_dir true" in message and "--resume_from_checkpoint true" in message

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main("sft", train_argv("sft", ckpt, data, blocker / "out")) == 2  # unwritable, even for root
    assert f"--output_dir {blocker / 'out'}: cannot write there" in capsys.readouterr().err
    assert main("sft", train_argv("sft", ckpt, data, blocker)) == 2
    assert f"--output_dir {blocker}: is a file" in capsys.readouterr().err


def test_overwrite_trains_into_a_used_folder_without_its_old_checkpoints(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-9").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    argv = train_argv("sft", tiny_checkpoint("qwen2_vl"), write_data(tmp_path, "sft"), out, overwrite_output_dir="true")
    assert main("sft", argv) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoint-9").exists()  # a later --resume_from_checkpoint true cannot pick the old run's


# ------------------------------------------------------------------------------------------------ failed saves


def _disk_full(target: Path) -> Callable[..., None]:
    original = transformers.Trainer.save_model

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if Path(output_dir or self.args.output_dir) == target:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, output_dir, _internal_call)

    return save_model


def test_final_save_failure_keeps_the_weights_and_says_where(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(transformers.Trainer, "save_model", _disk_full(out))
    assert main("sft", train_argv("sft", tiny_checkpoint("qwen2_vl"), write_data(tmp_path, "sft"), out)) == 1
    message = _error(capsys)
    assert message.startswith(f"error: --output_dir {out}: could not be saved (No space left on device)")
    kept = Path(message.split("the trained weights were kept in ")[1])
    assert kept.parent == tmp_path and (kept / "adapter_model.safetensors").is_file()


def test_checkpoint_save_failure_stops_the_run_and_keeps_the_weights(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", full)  # midway through writing checkpoint-1
    out = tmp_path / "out"
    argv = train_argv("dpo", tiny_checkpoint("qwen2_vl"), write_data(tmp_path, "dpo"), out, save_strategy="steps")
    assert main("dpo", [*argv, "--save_steps", "1"]) == 1
    message = _error(capsys)
    assert f"step 1: checkpoint {out / 'checkpoint-1'}: could not be saved (No space left on device)" in message
    kept = Path(message.split("the trained weights were kept in ")[1])
    assert (kept / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoint-1").exists() and not (out / ".partial").exists()


# ------------------------------------------------------------------------------------------------ non-finite


@pytest.mark.parametrize("algorithm", ["sft", "ppo"])
def test_weights_gone_non_finite_stop_the_run(
    algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A learning rate of 1e37 (finite, so no flag check refuses it) overflows the LoRA weights within two steps:
    exit 1 naming the step and a tensor, nothing saved as if it had trained."""
    out = tmp_path / "out"
    flags = {"max_steps": 2, "learning_rate": "1e37", "save_strategy": "steps", "save_steps": 1}
    argv = _argv(algorithm, tiny_checkpoint("qwen2_vl"), write_data(tmp_path, DATA_KIND[algorithm]), out, **flags)
    assert main(algorithm, argv) == 1
    message = _error(capsys)
    assert message.startswith("error: step ")
    assert "hold NaN or infinity (first: " in message or " is nan" in message or " is inf" in message
    assert "Lower --learning_rate" in message
    assert not (out / "adapter_model.safetensors").exists()
    for checkpoint in out.glob("checkpoint-*"):  # any checkpoint kept was saved before the weights broke
        assert all(torch.isfinite(t).all() for t in _weights(checkpoint).values()), checkpoint
