"""One reward-model training step per family through the training entry point, then save and reload.

The trainer is built with ``resonance.commands.train.parse`` + ``build_trainer`` (what ``resonance train rm`` runs):
LoRA ``auto`` on the language model, frozen vision tower, a fresh scalar head. The GPU twin (marked gpu) trains the
same step in bf16 on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, expected_lora_layers, one_bf16_step, takes_system, train_argv, write_data
from peft.tuners.lora import LoraLayer

from resonance.base.model import unwrap
from resonance.base.registry import load_core_mapper
from resonance.base.reward import REWARD_CONFIG, REWARD_HEAD, VLRewardModel
from resonance.commands.train import build_trainer, parse

PREFIX = "model.base_model.model."  # VLRewardModel.model -> PEFT -> the transformers model


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_step_save_reload(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    output_dir = tmp_path / "out"
    data = write_data(tmp_path, "rm", takes_system(ckpt))
    model_args, data_args, config = parse("rm", train_argv("rm", ckpt, data, output_dir))
    trainer, _ = build_trainer("rm", model_args, data_args, config)
    mapper = load_core_mapper(ckpt)
    model_cls = mapper.model
    model = trainer.model
    assert isinstance(model, mapper.reward_model) and isinstance(trainer, mapper.reward_trainer)
    assert isinstance(trainer.data_collator, mapper.reward_collator)

    # LoRA only on the language model's target leaves; the head is fully trainable.
    lora_modules = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    expected = {PREFIX + name for name in expected_lora_layers(unwrap(model), model_cls)}
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


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_one_bf16_step_on_cuda(family: str, tiny_checkpoint, tmp_path: Path) -> None:
    """The GPU twin of test_reward_step_save_reload: one step in bf16 with gradient checkpointing on CUDA."""
    ckpt = tiny_checkpoint(family)
    one_bf16_step("rm", ckpt, write_data(tmp_path, "rm", takes_system(ckpt)), tmp_path / "out")
