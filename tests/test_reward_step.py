"""One reward-model training step per family through the training entry point, then save and reload.

The trainer is built with ``resonance.commands.train.parse`` + ``build_trainer`` (what ``resonance train rm`` runs):
LoRA ``auto`` on the language model, frozen vision tower, a fresh scalar head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from helpers import write_jsonl
from peft.tuners.lora import LoraLayer
from test_train_step import PREFERENCE_ROWS, save_images

from resonance.base.model import unwrap
from resonance.base.registry import load_core_mapper
from resonance.base.reward import REWARD_CONFIG, REWARD_HEAD, VLRewardModel
from resonance.commands.train import build_trainer, parse

PREFIX = "model.base_model.model."  # VLRewardModel.model -> PEFT -> the transformers model


def _data(tmp_path: Path) -> Path:
    save_images(tmp_path)
    rows = [PREFERENCE_ROWS[0], {**PREFERENCE_ROWS[1], "margin": 1.5}]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def rm_argv(ckpt: Path, data: Path, output_dir: Path, lora: str = "auto") -> list[str]:
    return [
        "--model_name_or_path", str(ckpt),
        "--data_path", str(data),
        "--output_dir", str(output_dir),
        "--max_steps", "1",
        "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2",
        "--lora_target_modules", lora,
        "--freeze_vision_tower", "True",
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--report_to", "none",
    ]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_step_save_reload(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    output_dir = tmp_path / "out"
    model_args, data_args, config = parse("rm", rm_argv(ckpt, _data(tmp_path), output_dir))
    trainer, _ = build_trainer("rm", model_args, data_args, config)
    mapper = load_core_mapper(ckpt)
    model_cls = mapper.model
    model = trainer.model
    assert isinstance(model, mapper.reward_model) and isinstance(trainer, mapper.reward_trainer)
    assert isinstance(trainer.data_collator, mapper.reward_collator)

    # LoRA only on the language model's target leaves; the head is fully trainable.
    lm_path = model_cls.language_model_path
    lora_modules = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    targets = set(model_cls.default_lora_target)
    expected = {
        PREFIX + name
        for name, _ in unwrap(model).named_modules()
        if name.startswith(lm_path + ".") and name.rsplit(".", 1)[-1] in targets
    }
    assert lora_modules and lora_modules == expected
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"score.weight", "score.bias"} <= trainable
    assert all(name.startswith("score.") or ".lora_" in name for name in trainable), trainable

    tower = model_cls.get_vision_tower(model)
    assert not any(p.requires_grad for p in tower.parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora_b = [name for name in before if ".lora_B.default." in name]
    assert lora_b

    trainer.train()

    after = dict(model.named_parameters())
    for name, value in before.items():
        if name.startswith("score.") or ".lora_" in name:
            continue
        assert torch.equal(after[name], value), f"{name} changed"  # tower, projector, base LM weights
    assert not torch.equal(after["score.weight"], before["score.weight"]), "the reward head did not train"
    for name in lora_b:
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"])
    for key in ("accuracy", "reward_gap", "chosen_reward", "rejected_reward"):
        assert math.isfinite(logs[0][key]), key
    assert logs[0]["accuracy"] in (0.0, 0.5, 1.0)  # two pairs

    trainer.save_model(config.output_dir)
    saved = {p.name for p in output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", REWARD_HEAD, REWARD_CONFIG} <= saved
    assert "processor_config.json" in saved or "preprocessor_config.json" in saved

    # The output folder reloads to the same rewards (eval mode: no LoRA dropout).
    reloaded = VLRewardModel.from_pretrained(output_dir, dtype=torch.float32).eval()
    assert type(reloaded) is mapper.reward_model
    model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        chosen, rejected = trainer.rewards(model, batch)
        chosen_again, rejected_again = trainer.rewards(reloaded, batch)
    torch.testing.assert_close(chosen_again, chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(rejected_again, rejected, rtol=0, atol=1e-5)
