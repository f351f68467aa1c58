"""Reward modelling: Bradley-Terry training of the family's reward model (:mod:`resonance.base.reward`) on
preference pairs, on transformers' Trainer, encoding frozen-tower images once."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from trl.trainer.base_config import _BaseConfig as TrlDefaults

from resonance.algorithms import ALGORITHMS
from resonance.algorithms.arguments import DataArguments, ModelArguments, router_aux_loss_coef_field
from resonance.algorithms.guards import WholeCheckpoints
from resonance.algorithms.image_features import ImageEncodingMixin, add_to_loss
from resonance.algorithms.setup import build_offline_trainer
from resonance.base.model import VLModel, unwrap
from resonance.base.processor import VLProcessor
from resonance.base.registry import ModelCoreMapper
from resonance.base.reward import VLRewardModel, router_loss_coefficient

logger = logging.getLogger("resonance")


def bradley_terry(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean ``-logsigmoid(chosen - rejected - margin)`` and per-pair metrics (accuracy: chosen > rejected)."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin.to(difference)
    loss = -F.logsigmoid(difference).mean()
    metrics = {
        "accuracy": (chosen > rejected).float(),
        "reward_gap": (chosen - rejected).detach(),
        "chosen_reward": chosen.detach(),
        "rejected_reward": rejected.detach(),
    }
    return loss, metrics


@dataclass
class VLRewardConfig(TrlDefaults):
    """``TrainingArguments`` with TRL's defaults (as ``trl.RewardConfig``: learning rate 1e-4, logging every 10
    steps, gradient checkpointing, bf16 unless --fp16) plus ``max_length`` (tokens per chosen or rejected row, image
    tokens included) and ``pad_to_multiple_of`` (as in TRL's configs)."""

    learning_rate: float = field(
        default=1e-4, metadata={"help": "The initial learning rate for AdamW (as TRL's RewardConfig)."}
    )

    max_length: int | None = field(
        default=1024,
        metadata={"help": "Longest chosen/rejected row in tokens (image tokens included); longer rows fail or skip."},
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad each batch to a multiple of this many tokens."}
    )
    router_aux_loss_coef: float | None = router_aux_loss_coef_field()


class VLRewardTrainer(WholeCheckpoints, ImageEncodingMixin, Trainer):
    """transformers' Trainer with the Bradley-Terry loss; images encoded once for chosen and rejected.

    Logs ``accuracy``, ``reward_gap`` (mean chosen - rejected), ``chosen_reward`` and ``rejected_reward``,
    averaged over the pairs since the last log (``eval_``-prefixed when evaluating).
    """

    def __init__(self, *args: Any, vl_model: type[VLModel], vl_processor: VLProcessor, **kwargs: Any):
        self._bind_adapter(vl_model, vl_processor)
        self._metric_sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._metric_counts = {"train": 0, "eval": 0}
        super().__init__(*args, **kwargs)
        backbone = self._reward_model(self.model).model
        vl_model.batch_vision_attention(backbone)
        self.router_aux_loss_coef = router_loss_coefficient(backbone, self.args.router_aux_loss_coef)
        self.aux_loss_enabled = self.router_aux_loss_coef != 0.0  # TRL's trainers' name
        self.router_loss: torch.Tensor | None = None  # the last rewards() call's (see there)

    def _reward_model(self, model: nn.Module) -> VLRewardModel:
        model = self.accelerator.unwrap_model(model)
        if not isinstance(model, VLRewardModel):
            raise TypeError(f"VLRewardTrainer trains a VLRewardModel, got {type(model).__name__}")
        return model

    def rewards(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rewards, rejected rewards) of a reward batch; where the router loss is on, its value for the batch
        is kept for :meth:`compute_loss` (``router_loss``)."""
        inputs = {k: v for k, v in inputs.items() if k != "margin"}
        inputs = self._image_model_inputs(self._reward_model(model).model, inputs, copies=2)
        if self.aux_loss_enabled:
            rewards, self.router_loss = model(**inputs, router_loss=True)
        else:
            rewards, self.router_loss = model(**inputs), None
        half = rewards.shape[0] // 2
        return rewards[:half], rewards[half:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        with self._idle_encoder(model, inputs, self._reward_model(model).model) as idle:
            chosen, rejected = self.rewards(model, inputs)
        router_loss, self.router_loss = self.router_loss, None
        loss, metrics = bradley_terry(chosen, rejected, inputs.get("margin"))
        if router_loss is not None:
            loss = loss + self.router_aux_loss_coef * router_loss.to(loss.device)
            metrics["aux_loss"] = router_loss.detach().float().expand(chosen.shape[0])  # logged as TRL logs it
        loss = add_to_loss(loss, idle.term)
        mode = "train" if model.training else "eval"
        for name, values in metrics.items():
            self._metric_sums[mode][name] += values.float().sum().item()
        self._metric_counts[mode] += chosen.shape[0]
        if return_outputs:
            return loss, {"rewards_chosen": chosen, "rewards_rejected": rejected}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: D102
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, torch.stack([outputs["rewards_chosen"], outputs["rewards_rejected"]], dim=1), None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:  # noqa: D102
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        count = self._metric_counts[mode]
        if count:
            prefix = "eval_" if mode == "eval" else ""
            for name, total in self._metric_sums[mode].items():
                logs[prefix + name] = total / count
            self._metric_sums[mode].clear()
            self._metric_counts[mode] = 0
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        reward_model = self._reward_model(self.model)
        if state_dict is None or not self.is_fsdp_enabled:
            if self.args.should_save:  # one process writes (Trainer calls _save on every process)
                reward_model.save_pretrained(output_dir)
        elif self.args.should_save:  # FSDP: the whole state dict Trainer.save_model gathered on this process
            reward_model.save_pretrained(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, Path(output_dir) / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        reward_model = self._reward_model(model or self.model)
        if reward_model.is_lora:  # Trainer loads a PEFT adapter into the PEFT model
            super()._load_from_checkpoint(resume_from_checkpoint, model=reward_model.model)
        else:  # full weights, saved in the checkpoint's format: loaded the way from_pretrained reads them
            reward_model.load_backbone(resume_from_checkpoint)
        reward_model.load_head(resume_from_checkpoint)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Trainer's check of a loaded checkpoint, against the backbone (the reward model has no HF attributes)."""
        backbone = unwrap(self._reward_model(self.model).model)
        ignored = set(getattr(backbone, "_keys_to_ignore_on_save", None) or ())
        if load_result.missing_keys:
            if ignored and set(load_result.missing_keys) == ignored:
                backbone.tie_weights()
            else:
                logger.warning("There were missing keys in the checkpoint model loaded: %s.", load_result.missing_keys)
        if load_result.unexpected_keys:
            logger.warning(
                "There were unexpected keys in the checkpoint model loaded: %s.", load_result.unexpected_keys
            )


def build(
    mapper: ModelCoreMapper, model_args: ModelArguments, data_args: DataArguments, config: VLRewardConfig
) -> tuple[Any, VLProcessor]:
    """``resonance train rm``: preference rows, the family's reward model (a scalar head on the LoRA-wrapped
    model; the head is always fully trained), collator and trainer."""
    return build_offline_trainer(
        mapper,
        model_args,
        data_args,
        config,
        kind=ALGORITHMS["rm"].data,
        collator_cls=mapper.reward_collator,
        trainer_cls=mapper.reward_trainer,
        wrap=mapper.reward_model,
    )
