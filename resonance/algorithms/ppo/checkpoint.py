"""PPO checkpoints: the output folder and ``checkpoint-N`` (policy, value head, processor, optimizer, scheduler and
random states), written to a temporary folder and renamed, and resuming from one to the same weights an
uninterrupted run reaches."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resonance.algorithms.ppo.rewards import REWARD_ADAPTER

logger = logging.getLogger("resonance")

CHECKPOINT_STATE = "ppo_state.pt"  # optimizer, scheduler and RNG states
TRAINER_STATE = "trainer_state.json"


class PPOCheckpointing:
    """Saving and resuming for :class:`~resonance.algorithms.ppo.trainer.VLPPOTrainer` (a mixin: it reads the
    trainer's policy, optimizer, scheduler, counters and log history)."""

    def save_model(self, output_dir: str | Path | None = None) -> None:
        """The policy (full weights or LoRA adapter), its value head and the processor: a folder
        ``resonance generate`` and ``VLModelWithValueHead.from_pretrained`` load."""
        output_dir = Path(output_dir or self.args.output_dir)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        self._save_policy(output_dir)
        (output_dir / TRAINER_STATE).write_text(json.dumps(self._state(), indent=2) + "\n")

    def _save_policy(self, output_dir: Path) -> None:
        save_kwargs = {}
        if self.policy.is_lora and REWARD_ADAPTER in self.policy.model.peft_config:
            # only the policy's adapter: the reward adapter was loaded from its own folder
            save_kwargs["selected_adapters"] = [self.policy.model.active_adapter]
        self.policy.save_pretrained(output_dir, **save_kwargs)
        self.vl_processor.hf.save_pretrained(str(output_dir))

    def _state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "max_steps": self.total_steps,
            "log_history": self.log_history,
            **self.counters,
        }

    def save_checkpoint(self) -> Path:
        """``output_dir/checkpoint-<step>``: the policy as :meth:`save_model` writes it, plus optimizer,
        scheduler and RNG states. Written to a temporary folder and renamed, so a crash leaves no half
        checkpoint; the oldest beyond ``save_total_limit`` are removed."""
        output_dir = Path(self.args.output_dir)
        final = output_dir / f"checkpoint-{self.global_step}"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            temporary = output_dir / f".checkpoint-{self.global_step}.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            self._save_policy(temporary)
            rng = {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            }
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(), "rng": rng},
                temporary / CHECKPOINT_STATE,
            )
            (temporary / TRAINER_STATE).write_text(json.dumps(self._state(), indent=2) + "\n")
            torch.save(self.args, temporary / "training_args.bin")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
            self._rotate_checkpoints(output_dir)
            logger.info("saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def _rotate_checkpoints(self, output_dir: Path) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        checkpoints = sorted(
            (p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        for old in checkpoints[:-limit]:
            shutil.rmtree(old)

    def _checkpoint_path(self, resume: str | bool) -> Path:
        from transformers.trainer_utils import get_last_checkpoint

        if resume is True or str(resume).lower() in ("true", "last"):
            last = get_last_checkpoint(self.args.output_dir) if Path(self.args.output_dir).is_dir() else None
            if last is None:
                raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint-* folder in {self.args.output_dir}")
            return Path(last)
        path = Path(resume)
        if not (path / CHECKPOINT_STATE).is_file():
            raise FileNotFoundError(f"{path / CHECKPOINT_STATE}: not found; not a PPO checkpoint saved by Resonance")
        return path

    def _load_checkpoint(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        policy = self.policy
        if policy.is_lora:
            adapter = load_file(str(path / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(policy.model, adapter, adapter_name=policy.model.active_adapter)
            if result.unexpected_keys:
                raise ValueError(f"{path}: adapter weights that the policy lacks: {result.unexpected_keys[:5]}")
        else:
            policy.load_backbone(path)
        policy.load_head(path)
        state = torch.load(path / CHECKPOINT_STATE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        self.global_step = trainer_state["global_step"]
        self.log_history = trainer_state["log_history"]
        for name in self.counters:
            self.counters[name] = trainer_state.get(name, 0)
        logger.info("resumed from %s at step %d", path, self.global_step)
