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
from resonance.errors import ConfigError
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
    return backbone_pass(model, inputs)[0]


def backbone_pass(model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """:func:`final_hidden_states`, and the routers' logits of a mixture-of-experts backbone asked for them
    (``output_router_logits=True`` in ``inputs``; else None)."""
    base = unwrap(model)
    backbone = base.base_model
    if backbone is not base:
        outputs = backbone(**inputs, use_cache=False, return_dict=True)
        return outputs.last_hidden_state, getattr(outputs, "router_logits", None)
    with output_embeddings_as_identity(base):
        outputs = base(**inputs, use_cache=False, return_dict=True)
        return outputs.logits, getattr(outputs, "router_logits", None)


def router_loss_coefficient(model: nn.Module, coefficient: float | None) -> float:
    """The weight of the routers' load-balancing loss, as TRL's trainers decide it: the coefficient given, else the
    model config's own (resonance's setup makes it 0 where the spec's moe.aux_loss is off); 0 (off) for a model
    that returns no router logits, for which a coefficient other than 0 is refused."""
    text_config = unwrap(model).config.get_text_config()
    if not hasattr(text_config, "output_router_logits"):
        if coefficient:
            raise ConfigError(
                f"--router_aux_loss_coef {coefficient}: this model is not a mixture of experts that returns its "
                "router logits, so there is no router loss to weight (leave the flag out)"
            )
        return 0.0
    return getattr(text_config, "router_aux_loss_coef", 0.0) if coefficient is None else coefficient


def router_balance_loss(model: nn.Module, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor):
    """The routers' load-balancing loss, as TRL computes it for its trainers (Mixtral's, which the mixture-of-experts
    families share): from the text config's expert count and experts per token, over the unpadded tokens."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = unwrap(model).config.get_text_config()
    return load_balancing_loss_func(
        router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask
    )


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

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One reward per row; with ``router_loss=True`` (a mixture-of-experts backbone), also the routers'
        load-balancing loss of the batch: ``(rewards, loss)``."""
        inputs.pop("labels", None)
        router_loss = inputs.pop("router_loss", False)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        if router_loss:
            inputs["output_router_logits"] = True
        hidden, router_logits = backbone_pass(self.model, inputs)
        if hidden.shape[:2] != attention_mask.shape:
            raise ValueError(
                f"hidden states {tuple(hidden.shape)} do not match attention_mask {tuple(attention_mask.shape)}"
            )
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_positions(attention_mask).to(hidden.device)]
        rewards = self.score(last.to(self.score.weight.dtype)).squeeze(-1)
        if router_loss:
            return rewards, router_balance_loss(self.model, router_logits, attention_mask)
        return rewards

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
