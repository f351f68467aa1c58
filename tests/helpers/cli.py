"""THE argument builder for ``resonance train ALGORITHM`` and ``resonance generate``, and the installed command run
as users run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers.repo import TESTS

# A quick step on a tiny model: one optimizer step of 2 rows at a rate that visibly moves LoRA, LoRA on the
# language model's default targets, the vision tower frozen, a log line per step, nothing saved.
TRAIN_DEFAULTS: dict[str, Any] = {
    "max_steps": 1,
    "per_device_train_batch_size": 2,
    "learning_rate": "1e-2",
    "lora_target_modules": "auto",
    "freeze_vision_tower": True,
    "save_strategy": "no",
    "logging_steps": 1,
    "report_to": "none",
}

# The online algorithms' own quick settings: short completions, a fixed seed for their sampling.
ONLINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 4, "seed": 0},
    "ppo": {"num_mini_batches": 2, "num_ppo_epochs": 2, "response_length": 4, "disable_tqdm": True, "seed": 0},
}


def flags(values: dict[str, Any]) -> list[str]:
    """``{"max_steps": 2}`` -> ``["--max_steps", "2"]``, in order; a value of None leaves its flag out."""
    return [item for key, value in values.items() if value is not None for item in (f"--{key}", str(value))]


def train_argv(
    algorithm: str, ckpt: Path | str, data: Path | str, output_dir: Path | str, **overrides: Any
) -> list[str]:
    """The arguments of ``resonance train ALGORITHM`` (after the algorithm) for a quick run: :data:`TRAIN_DEFAULTS`,
    then the algorithm's :data:`ONLINE_DEFAULTS`, then ``overrides`` (None leaves a flag out, e.g.
    ``reward_funcs=None``)."""
    values = {"model_name_or_path": ckpt, "data_path": data, "output_dir": output_dir, **TRAIN_DEFAULTS}
    return flags({**values, **ONLINE_DEFAULTS.get(algorithm, {}), **overrides})


def generate_argv(ckpt: Path | str, data: Path | str, output: Path | str, **overrides: Any) -> list[str]:
    """The arguments of ``resonance generate``: checkpoint, prompts, output file, then generation flags."""
    return flags({"model_name_or_path": ckpt, "data_path": data, "output": output, **overrides})


def run_resonance(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``resonance`` console script, offline, with tests/ on PYTHONPATH (so ``--reward_funcs
    helpers.rewards:...`` imports)."""
    command = Path(sys.executable).parent / "resonance"
    assert command.is_file(), f"{command}: the resonance console script is not installed (pip install -e .)"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([str(command), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
