"""Reward modelling: a scalar head on a vision-language model, its pairwise collator and trainer.

``VLRewardModel`` runs the family's backbone (the module that returns final hidden states; the LM head
and its vocabulary-size logits are never computed) and maps the hidden state of each row's last
non-padding token to a scalar with ``score = nn.Linear(hidden, 1)``. ``VLRewardTrainer`` trains it
with the Bradley-Terry loss ``-logsigmoid(r_chosen - r_rejected - margin)`` on batches laid out like
DPO's (chosen rows, then rejected rows, the prompts' images once), encoding frozen images once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from resonance.base.collator import VLDPODataCollatorWithPadding
from resonance.base.heads import ScalarHeadModel
from resonance.base.model import VLModel, unwrap
from resonance.patches.fused_head import output_embeddings_as_identity

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
    with output_embeddings_as_identity(base):
        return base(**inputs, use_cache=False, return_dict=True).logits


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
