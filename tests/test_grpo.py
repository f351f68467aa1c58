"""GRPO (``resonance train grpo``, algorithms.grpo): learning, the command line, reward checks, family coverage.

The reward functions live in this module (importable as ``test_grpo:...`` since tests/ is on sys.path, and
through PYTHONPATH for the CLI subprocess).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILIES
from helpers import make_image, save_png, write_jsonl
from transformers import TrainerCallback

from resonance.algorithms.grpo import RewardFunctionError, load_reward_funcs
from resonance.base.registry import load_core_mapper
from resonance.commands.train import build_trainer, main, parse
from resonance.errors import UnsupportedModelError

TESTS = Path(__file__).resolve().parent
UNSUPPORTED = {"instructblip", "mllama"}  # see resonance.algorithms.grpo.unsupported_reason
TARGET = {"id": -1}  # the token the learning test rewards


def share_of_target(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any
) -> list[float]:
    """The share of a completion's tokens that are the target token."""
    return [sum(token == TARGET["id"] for token in ids) / max(len(ids), 1) for ids in completion_ids]


def constant_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [1.0] * len(prompts)


def nan_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [0.5] * (len(prompts) - 1) + [float("nan")]


def none_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float | None]:
    return [None] * len(prompts)


def raising_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    raise KeyError("answer")


def token_sum_reward(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any
) -> list[float]:
    """Differs between completions (so advantages are not all zero) without favouring anything in particular."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def short_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [1.0]


NOT_A_FUNCTION = 3


def _data(tmp_path: Path, rows: int = 2) -> Path:
    save_png(tmp_path, "red.png", make_image(40, 30, seed=1))
    save_png(tmp_path, "box.png", make_image(64, 48, seed=2))
    data = [
        {"image": "red.png", "prompt": "<image>\nWhat colour is it?"},
        {"images": ["box.png"], "prompt": [{"role": "user", "content": "<image>\nDescribe the picture."}]},
    ]
    return write_jsonl(tmp_path / "prompts.jsonl", data[:rows])


def _argv(ckpt: Path, data: Path, output_dir: Path, reward: str, **overrides: str) -> list[str]:
    flags = {
        "model_name_or_path": str(ckpt),
        "data_path": str(data),
        "output_dir": str(output_dir),
        "reward_funcs": reward,
        "max_steps": "1",
        "per_device_train_batch_size": "4",
        "num_generations": "2",
        "max_completion_length": "4",
        "learning_rate": "1e-2",
        "lora_target_modules": "auto",
        "freeze_vision_tower": "True",
        "save_strategy": "no",
        "logging_steps": "1",
        "seed": "0",
        **overrides,
    }
    return [item for key, value in flags.items() for item in (f"--{key}", value)]


# -------------------------------------------------------------------------------------------- learning


class _StopWhenLearned(TrainerCallback):
    """Ends training once the mean reward of the last 3 steps passes 0.6 (about 15 steps; 5 s on 2 idle cores)."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        rewards = [entry["reward"] for entry in state.log_history if "reward" in entry]
        if len(rewards) >= 5 and sum(rewards[-3:]) / 3 > 0.6:
            control.should_training_stop = True


def test_reward_rises(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """The mean reward (share of one chosen token in the completions) climbs from ~0 to most of the tokens.

    An update of the wrong sign drives the share to 0 (checked by hand: negating TRL's loss keeps every step's
    reward at 0 over 60 steps), so this fails for it.
    """
    ckpt = tiny_checkpoint("llava")
    mapper = load_core_mapper(ckpt)
    TARGET["id"] = mapper.processor(ckpt).tokenizer.convert_tokens_to_ids("a")
    overrides = {
        "max_steps": "60",
        "per_device_train_batch_size": "16",
        "num_generations": "16",
        "max_completion_length": "12",
        "learning_rate": "5e-2",
        "lr_scheduler_type": "constant",
        "lora_target_modules": "none",
    }
    model_args, data_args, config = parse(
        "grpo", _argv(ckpt, _data(tmp_path), tmp_path / "out", "test_grpo:share_of_target", **overrides)
    )
    trainer, _ = build_trainer("grpo", model_args, data_args, config)
    trainer.add_callback(_StopWhenLearned())
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert all(math.isfinite(r) for r in rewards)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-3:]) / 3
    assert first < 0.05, rewards  # a random model: about 1 token in 400
    assert last > 0.5 and last > first + 0.4, rewards  # stopped early (learned) or ran all 60 steps


# ------------------------------------------------------------------------------------------ command line


def test_cli_end_to_end(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """``resonance train grpo ...`` (the console script) trains LoRA and saves adapter + processor."""
    command = Path(sys.executable).parent / "resonance"
    assert command.is_file(), f"{command}: the resonance console script is not installed (pip install -e .)"
    ckpt = tiny_checkpoint("llava")
    output_dir = tmp_path / "out"
    argv = _argv(ckpt, _data(tmp_path), output_dir, "test_grpo:constant_reward", max_steps="2", beta="0.04")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [str(command), "train", "grpo", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    saved = {p.name for p in output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json"} <= saved
    assert f"saved to {output_dir.resolve()}" in result.stderr


# ---------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:f", "--reward_funcs 'no_such_module_xyz:f': cannot import module"),
        ("test_grpo:missing", "--reward_funcs 'test_grpo:missing': module 'test_grpo' has no 'missing'"),
        ("test_grpo", "write a reward function as 'module:function'"),
        ("test_grpo:NOT_A_FUNCTION", "is not callable"),
        ("", "--reward_funcs is required"),
    ],
)
def test_bad_reward_name(name: str, message: str) -> None:
    with pytest.raises(RewardFunctionError, match=message.replace("(", r"\(")):
        load_reward_funcs(name)


def test_bad_reward_name_cli(tmp_path: Path, tiny_checkpoint: Callable[[str], Path], capsys) -> None:
    ckpt = tiny_checkpoint("llava")
    code = main("grpo", _argv(ckpt, _data(tmp_path), tmp_path / "out", "test_grpo:missing"))
    assert code == 2
    assert "error: --reward_funcs 'test_grpo:missing'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("nan_reward", r"returned nan for completion 3 of row .*prompts.jsonl:2: every reward must be a finite"),
        ("none_reward", r"returned None for completion 0 of row .*prompts.jsonl:1"),
        ("raising_reward", r"test_grpo:raising_reward \(--reward_funcs\) raised KeyError: 'answer'"),
        ("short_reward", r"returned 1 rewards for 4 completions"),
    ],
)
def test_bad_reward_value_stops_before_update(
    reward: str, message: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """A NaN/None reward, a raising function or a wrong count is an error before any weight moves."""
    ckpt = tiny_checkpoint("llava")
    argv = _argv(ckpt, _data(tmp_path), tmp_path / "out", f"test_grpo:{reward}", shuffle_dataset="False")
    trainer, _ = build_trainer("grpo", *parse("grpo", argv))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(RewardFunctionError, match=message):
        trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())


# --------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in UNSUPPORTED])
def test_one_step(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """One GRPO step (LoRA auto, frozen tower, KL to the adapter-disabled reference): LoRA B moves, the rest
    stays, the loss is finite."""
    ckpt = tiny_checkpoint(family)
    argv = _argv(ckpt, _data(tmp_path), tmp_path / "out", "test_grpo:token_sum_reward", beta="0.04")
    trainer, _ = build_trainer("grpo", *parse("grpo", argv))
    model = trainer.model
    tower = load_core_mapper(ckpt).model.get_vision_tower(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    lora_b = [n for n in before if ".lora_B." in n]
    assert lora_b
    assert any(not torch.equal(after[n], before[n]) for n in lora_b), "no LoRA weight trained"
    for name, value in before.items():
        if ".lora_" not in name:
            assert torch.equal(after[name], value), name
    assert not any(p.requires_grad for p in tower.parameters())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_family(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    argv = _argv(ckpt, _data(tmp_path), tmp_path / "out", "test_grpo:constant_reward")
    with pytest.raises(UnsupportedModelError, match="GRPO: .*TRL's GRPOTrainer"):
        build_trainer("grpo", *parse("grpo", argv))


def test_paligemma_completion_is_causal(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """PaliGemma's completion log-probs do not see later completion tokens (TRL marks them prefix: bidirectional)."""
    ckpt = tiny_checkpoint("paligemma")
    argv = _argv(ckpt, _data(tmp_path), tmp_path / "out", "test_grpo:constant_reward")
    trainer, processor = build_trainer("grpo", *parse("grpo", argv))
    prompt = processor.render_conversation(
        [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Caption."}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[prompt], images=[[make_image(40, 30, seed=1)]])
    model = trainer.model
    logps = []
    first, second, third, other = processor.tokenizer("a b c d", add_special_tokens=False)["input_ids"][:4]
    assert processor.image_token_id not in (first, second, third, other)
    for last in (third, other):
        ids = torch.cat([inputs["input_ids"], torch.tensor([[first, second, last]])], dim=1)
        token_type_ids = torch.cat([inputs["token_type_ids"], torch.zeros(1, 3, dtype=torch.long)], dim=1)  # as TRL
        with torch.no_grad():
            out, _, _ = trainer._get_per_token_logps_and_entropies(
                model,
                ids,
                torch.ones_like(ids),
                3,
                pixel_values=inputs["pixel_values"],
                token_type_ids=token_type_ids,
                num_images=[1],
            )
        logps.append(out)
    torch.testing.assert_close(logps[0][:, :2], logps[1][:, :2])
