"""Checkpoint -> adapter (``config.json`` architectures[0] -> MODEL_NICKNAME_MAP -> core_mapper); LoRA -> base."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resonance.errors import CheckpointError, UnsupportedModelError
from resonance.generated.registry import FLASH_ATTN_MODELS, MODEL_NICKNAME_MAP

__all__ = ["FLASH_ATTN_MODELS", "MODEL_NICKNAME_MAP", "ModelCoreMapper", "load_core_mapper"]


@dataclass(frozen=True)
class ModelCoreMapper:
    """Every component of one family's adapter (the seed's ``core_mapper``); generated adapters fill every slot
    (the slots are :data:`resonance.codegen.hooks.SLOTS`)."""

    model: Any
    processor: Any
    sft_collator: Any
    sft_trainer: Any
    dpo_collator: Any
    dpo_trainer: Any
    reward_model: Any
    reward_collator: Any
    reward_trainer: Any
    value_model: Any
    ppo_collator: Any
    ppo_trainer: Any
    grpo_trainer: Any


def lora_base_checkpoint(path: str | Path) -> Path | None:
    """For a LoRA output folder (``adapter_config.json``), the base checkpoint it was trained on; else None.

    The one place a LoRA folder is followed to its base model: for the architecture, the weights, the processor
    and the reward model that shares the policy's backbone.
    """
    adapter = Path(path) / "adapter_config.json"
    if not adapter.is_file():
        return None
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{adapter}: names no base_model_name_or_path, so its base model cannot be found")
    return Path(base)


def processor_checkpoint(path: str | Path) -> Path:
    """Where a checkpoint's processor is: the folder itself, or for a LoRA folder saved without one, its base."""
    path = Path(path)
    has_processor = any((path / name).is_file() for name in ("processor_config.json", "tokenizer_config.json"))
    base = None if has_processor else lora_base_checkpoint(path)
    return base if base is not None else path


def checkpoint_architecture(path: str | Path) -> str:
    """``architectures[0]`` of a checkpoint, following a LoRA output folder to its base model."""
    path = Path(path)
    base = None if (path / "config.json").is_file() else lora_base_checkpoint(path)
    config_file = (base or path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found; --model_name_or_path must be a checkpoint folder")
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
