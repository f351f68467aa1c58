"""Checkpoint -> adapter: ``config.json`` architectures[0] -> MODEL_NICKNAME_MAP -> core_mapper."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resonance.generated.registry import FLASH_ATTN_MODELS, MODEL_NICKNAME_MAP

__all__ = [
    "FLASH_ATTN_MODELS",
    "MODEL_NICKNAME_MAP",
    "ModelCoreMapper",
    "UnsupportedModelError",
    "load_core_mapper",
]


@dataclass(frozen=True)
class ModelCoreMapper:
    """Every component of one family's adapter (the seed's ``core_mapper``).

    Every generated adapter fills every slot; the reward and PPO slots default to None only for adapters
    generated before they existed (``resonance scaffold`` fills them).
    """

    model: Any
    processor: Any
    sft_collator: Any
    sft_trainer: Any
    dpo_collator: Any
    dpo_trainer: Any
    reward_model: Any = None
    value_model: Any = None
    reward_collator: Any = None
    reward_trainer: Any = None
    ppo_collator: Any = None
    ppo_trainer: Any = None


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no adapter."""


def checkpoint_architecture(path: str | Path) -> str:
    """``architectures[0]`` of a checkpoint, following a LoRA output folder to its base model."""
    path = Path(path)
    adapter = path / "adapter_config.json"
    if adapter.is_file() and not (path / "config.json").is_file():
        path = Path(json.loads(adapter.read_text())["base_model_name_or_path"])
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; --model_name_or_path must be a checkpoint folder")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if not architectures:
        raise UnsupportedModelError(f"{config_file}: has no 'architectures' entry to choose an adapter by")
    return architectures[0]


def load_core_mapper(path: str | Path) -> ModelCoreMapper:
    """The adapter for a checkpoint folder, or an error listing what is supported."""
    architecture = checkpoint_architecture(path)
    name = MODEL_NICKNAME_MAP.get(architecture)
    if name is None:
        supported = "\n  ".join(f"{arch} ({nick})" for arch, nick in sorted(MODEL_NICKNAME_MAP.items()))
        raise UnsupportedModelError(
            f"{path}: architecture {architecture!r} has no Resonance adapter. Supported:\n  {supported}\n"
            f"To add one, write specs/<name>.yaml for it and run `resonance scaffold specs/<name>.yaml`."
        )
    return importlib.import_module(f"resonance.generated.{name}").core_mapper
