"""Reward modelling: a scalar head on a vision-language model, its pairwise collator and trainer.

``VLRewardModel`` runs the family's backbone (the module that returns final hidden states; the LM head
and its vocabulary-size logits are never computed) and maps the hidden state of each row's last
non-padding token to a scalar with ``score = nn.Linear(hidden, 1)``. ``VLRewardTrainer`` trains it
with the Bradley-Terry loss ``-logsigmoid(r_chosen - r_rejected - margin)`` on batches laid out like
DPO's (chosen rows, then rejected rows, the prompts' images once), encoding frozen images once.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

from resonance.base.collator import VLDPODataCollatorWithPadding
from resonance.base.heads import ScalarHeadModel
from resonance.base.model import VLModel, unwrap
from resonance.base.processor import VLProcessor
from resonance.base.trainer import _ImageEncodingMixin

REWARD_CONFIG = "reward_config.json"
REWARD_HEAD = "reward_head.safetensors"
FORMAT = "resonance-reward-model"

logger = logging.getLogger("resonance")


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-padding token; right, left (or any) padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(dim=1)


def final_hidden_states(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The final (normed) hidden states of the language model, ``(batch, length, hidden)``, without the LM head.

    Where the model has a backbone (transformers' ``base_model``: ``model.model`` for most families, taking
    the same image inputs as ``forward``, including ``mm_encoder_outputs``, Mllama's
    ``cross_attention_states`` and PaliGemma's ``token_type_ids``), that backbone is called. A model without
    one (InstructBLIP: the language model is a whole causal LM) runs its own ``forward`` with the output
    embeddings swapped for an identity, so its "logits" are the final hidden states.
    """
    base = unwrap(model)
    backbone = base.base_model
    if backbone is not base:
        return backbone(**inputs, use_cache=False, return_dict=True).last_hidden_state
    head = base.get_output_embeddings()
    base.set_output_embeddings(nn.Identity())
    try:
        return base(**inputs, use_cache=False, return_dict=True).logits
    finally:
        base.set_output_embeddings(head)


class VLRewardModel(ScalarHeadModel):
    """A family's model (or its PEFT/LoRA wrapper) with a scalar reward head (``score``).

    ``forward(**batch)`` returns one reward per row, ``(batch,)``, in float32. Generated adapters subclass
    it with ``vl_model`` set; the base class finds the family from the checkpoint in :meth:`from_pretrained`.
    Saving and loading (backbone, ``reward_head.safetensors``, ``reward_config.json``) are
    :class:`~resonance.base.heads.ScalarHeadModel`'s.
    """

    head_attribute = "score"
    head_file = REWARD_HEAD
    config_file = REWARD_CONFIG
    file_format = FORMAT
    mapper_slot = "reward_model"
    what = "reward model"

    def __init__(self, model: nn.Module, vl_model: type[VLModel] | None = None, score: nn.Linear | None = None):
        super().__init__(model, vl_model, score)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any) -> torch.Tensor:
        inputs.pop("labels", None)
        hidden = final_hidden_states(self.model, {"input_ids": input_ids, "attention_mask": attention_mask, **inputs})
        if hidden.shape[:2] != attention_mask.shape:
            raise ValueError(
                f"hidden states {tuple(hidden.shape)} do not match attention_mask {tuple(attention_mask.shape)}"
            )
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_positions(attention_mask).to(hidden.device)]
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1)

    def description(self) -> dict[str, Any]:  # noqa: D102
        return {**super().description(), "pooling": "last non-padding token"}


class VLRewardDataCollatorWithPadding(VLDPODataCollatorWithPadding):
    """Preference rows -> chosen rows then rejected rows (the DPO collator's layout, images once) and ``margin``.

    ``margin`` is each pair's float margin (0 where a row gives none); no labels or completion mask.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        output, kept = self.pair_batch(features)
        output.pop("completion_mask")
        output["margin"] = torch.tensor([float(f.get("margin") or 0.0) for f in kept], dtype=torch.float32)
        return output


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
class VLRewardConfig(TrainingArguments):
    """``TrainingArguments`` plus ``max_length`` (tokens per chosen or rejected row, image tokens included) and
    ``pad_to_multiple_of`` (as in TRL's configs)."""

    max_length: int | None = field(
        default=1024,
        metadata={"help": "Longest chosen/rejected row in tokens (image tokens included); longer rows fail or skip."},
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad each batch to a multiple of this many tokens."}
    )


class VLRewardTrainer(_ImageEncodingMixin, Trainer):
    """transformers' Trainer with the Bradley-Terry loss; images encoded once for chosen and rejected.

    Logs ``accuracy``, ``reward_gap`` (mean chosen - rejected), ``chosen_reward`` and ``rejected_reward``,
    averaged over the pairs since the last log (``eval_``-prefixed when evaluating).
    """

    def __init__(self, *args: Any, vl_model: type[VLModel], vl_processor: VLProcessor, **kwargs: Any):
        self._bind_adapter(vl_model, vl_processor)
        self._metric_sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._metric_counts = {"train": 0, "eval": 0}
        super().__init__(*args, **kwargs)

    def _reward_model(self, model: nn.Module) -> VLRewardModel:
        model = self.accelerator.unwrap_model(model)
        if not isinstance(model, VLRewardModel):
            raise TypeError(f"VLRewardTrainer trains a VLRewardModel, got {type(model).__name__}")
        return model

    def rewards(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rewards, rejected rewards) of a reward batch."""
        inputs = {k: v for k, v in inputs.items() if k != "margin"}
        inputs = self._image_model_inputs(self._reward_model(model).model, inputs, copies=2)
        rewards = model(**inputs)
        half = rewards.shape[0] // 2
        return rewards[:half], rewards[half:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        chosen, rejected = self.rewards(model, inputs)
        loss, metrics = bradley_terry(chosen, rejected, inputs.get("margin"))
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
        self._reward_model(self.model).save_pretrained(output_dir)
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
