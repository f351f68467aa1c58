"""What every GPU twin of a training test checks (run on the device machine: ``python -m pytest -m gpu``).

On a GPU the frozen-vision path, bf16 autocast and the attention choice differ from the CPU run, so each
algorithm's one-step test has a twin that trains one step in bf16 with gradient checkpointing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from helpers.cli import train_argv

ONLINE = ("ppo", "grpo")


def one_bf16_step(algorithm: str, ckpt: Path, data: Path, output_dir: Path, **overrides: Any) -> None:
    """One ``resonance train ALGORITHM`` step in bf16 with gradient checkpointing and eager layers on CUDA
    (``train_argv``'s quick settings plus ``overrides``): the model is on the GPU, the frozen vision tower is unchanged
    (and, for sft, dpo and rm, ran once: its features are reused for every pass of the step), the logged losses are
    finite."""
    from resonance.commands.train import build_trainer, parse

    assert torch.cuda.is_available(), "a GPU test: run it on the device machine with -m gpu"
    # eager layers unless told: with --compile_layers auto each test compiled its family's layers anew, most of its
    # time on the H200 (PPO on Gemma 3: 113 s), and the GPU tests outgrew a session's 30 minutes of device time.
    # test_compile.py has the compiled layers' GPU twin
    overrides = {"compile_layers": False, **overrides}
    argv = train_argv(algorithm, ckpt, data, output_dir, bf16=True, gradient_checkpointing=True, **overrides)
    trainer, _ = build_trainer(algorithm, *parse(algorithm, argv))
    model = trainer.policy if algorithm == "ppo" else trainer.model
    tower = trainer.vl_model.get_vision_tower(model)
    before = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    calls = []
    tower.register_forward_hook(lambda *args: calls.append(1))
    trainer.train()
    assert next(model.parameters()).is_cuda and next(tower.parameters()).is_cuda
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    if algorithm not in ONLINE:  # generation runs the tower once per decoding pass: not counted there
        assert len(calls) == 1, f"vision tower ran {len(calls)} times in one step"
    history = trainer.log_history if algorithm == "ppo" else trainer.state.log_history
    key = "policy_loss" if algorithm == "ppo" else "loss"
    values = [entry[key] for entry in history if key in entry]
    assert values and all(torch.isfinite(torch.tensor(values)))
