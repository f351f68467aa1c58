"""One unit per ``resonance train X``, and :data:`ALGORITHMS`, the table that drives the command.

This module imports nothing heavy (the CLI reads the table to build its subcommands without torch): each entry
names its config class and its build function as ``module:name`` strings, imported when the command runs.
Adding an algorithm touches its own module (config, trainer, ``build``) and this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Algorithm:
    """What ``resonance train <name>`` needs to know about one algorithm."""

    name: str
    help: str  # the subcommand's one-line help
    config: str  # module:Class of its config (TrainingArguments subclass); the only place its flags are defined
    build: str  # module:function(mapper, model_args, data_args, config) -> (trainer, processor)
    data: Literal["sft", "preference", "prompt"]  # the row kind it reads (resonance.data)
    slots: tuple[str, ...]  # the core_mapper classes it uses

    def config_class(self) -> type:
        return _load(self.config)

    def builder(self) -> Any:
        return _load(self.build)


def _load(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


ALGORITHMS: dict[str, Algorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        Algorithm(
            "sft",
            "Supervised fine-tuning. Takes TrainingArguments/SFTConfig flags; --help lists them.",
            "trl:SFTConfig",
            "resonance.algorithms.sft:build",
            "sft",
            ("model", "processor", "sft_collator", "sft_trainer"),
        ),
        Algorithm(
            "dpo",
            "Direct preference optimisation. Takes TrainingArguments/DPOConfig flags; --help lists them.",
            "resonance.algorithms.dpo.config:VLDPOConfig",
            "resonance.algorithms.dpo.trainer:build",
            "preference",
            ("model", "processor", "dpo_collator", "dpo_trainer"),
        ),
        Algorithm(
            "rm",
            "Reward modelling (Bradley-Terry on preference pairs). Takes TrainingArguments flags and --max_length.",
            "resonance.algorithms.rm:VLRewardConfig",
            "resonance.algorithms.rm:build",
            "preference",
            ("model", "processor", "reward_model", "reward_collator", "reward_trainer"),
        ),
        Algorithm(
            "grpo",
            "GRPO on prompt rows with --reward_funcs module:function. Takes TrainingArguments/GRPOConfig flags.",
            "resonance.algorithms.grpo:VLGRPOConfig",
            "resonance.algorithms.grpo:build",
            "prompt",
            ("model", "processor", "grpo_trainer"),
        ),
        Algorithm(
            "ppo",
            "PPO on prompt rows, rewarded by --reward_funcs and/or --reward_model_path. Takes TrainingArguments flags.",
            "resonance.algorithms.ppo.config:VLPPOConfig",
            "resonance.algorithms.ppo.trainer:build",
            "prompt",
            ("model", "processor", "value_model", "ppo_collator", "ppo_trainer", "reward_model"),
        ),
    )
}
