"""Loading a checkpoint runs no layer code fetched from the Hub: transformers 5.25 (which requires the kernels
package) turns hub kernels on by default, and each later ``train()``/``eval()`` on a GPU would fetch and run them."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import REWARDS, train_argv, write_data

from resonance.base.model import unwrap
from resonance.base.registry import load_core_mapper
from resonance.commands.train import build_trainer, parse


def test_a_loaded_model_does_not_use_hub_kernels(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("gemma3")  # Gemma 3's decoder layers and rotary embedding have hub-kernel mappings
    model = load_core_mapper(ckpt).model.from_pretrained(ckpt, dtype=torch.float32)
    assert model.use_kernels is False
    model.train()  # a mode change re-kernelizes a model that uses them
    assert model.use_kernels is False and model.kernels_mode is None


def test_grpos_reference_loaded_by_trl_does_not_use_hub_kernels(tiny_checkpoint, tmp_path: Path) -> None:
    """Full training with beta > 0: TRL loads the reference itself, from the checkpoint, with transformers' default."""
    argv = train_argv(
        "grpo", tiny_checkpoint("gemma3"), write_data(tmp_path, "prompt"), tmp_path / "out",
        lora_target_modules="none", beta="0.04", reward_funcs=f"{REWARDS}:token_sum_reward",
    )  # fmt: skip
    trainer, _ = build_trainer("grpo", *parse("grpo", argv))
    reference = unwrap(trainer.ref_model)
    assert reference is not unwrap(trainer.model)
    assert reference.use_kernels is False and reference.kernels_mode is None
