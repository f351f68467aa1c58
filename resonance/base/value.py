"""The PPO policy-and-value model: a family's model (or its LoRA wrapper) with a per-token scalar value head.

One backbone pass gives the final hidden states (:func:`resonance.base.reward.final_hidden_states`; the LM head
is not run by the model). The LM head then runs only on the positions that predict response tokens, and the
value head ``v_head = nn.Linear(hidden, 1)`` (float32) on the same positions, so ``values[:, i]`` is the value of
the state in which ``logits[:, i]`` picks the i-th response token: ``V(s_t)`` for the action ``a_t``, the
alignment :func:`resonance.algorithms.ppo.math.compute_gae` expects.

Saving writes the backbone (full weights or the LoRA adapter), ``value_head.safetensors`` and
``value_config.json`` (:class:`~resonance.base.heads.ScalarHeadModel`); :meth:`VLModelWithValueHead.from_pretrained`
reloads them.

Left padding (rollouts from :func:`resonance.generation.generate_batch`) needs no position ids: every family's
language model uses rotary positions, which only see distances between tokens, or derives positions from the
attention mask itself (Qwen's M-RoPE).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resonance.base.heads import ScalarHeadModel
from resonance.base.logprobs import token_log_probs
from resonance.base.model import VLModel, unwrap
from resonance.base.reward import backbone_pass, router_balance_loss

VALUE_CONFIG = "value_config.json"
VALUE_HEAD = "value_head.safetensors"
FORMAT = "resonance-value-model"


@functools.cache
def _forward_caps_logits(model_class: type) -> bool:
    """Whether ``model_class.forward`` soft-caps its logits (reads ``final_logit_softcapping``)."""
    try:
        return "final_logit_softcapping" in inspect.getsource(model_class.forward)
    except (OSError, TypeError):  # no source: trust the config
        return True


@dataclass
class ValueHeadOutput:
    """What :meth:`VLModelWithValueHead.forward` returns, over the scored positions (see there).

    ``logits`` ``(batch, n, vocab)`` in the model's dtype (``None`` with ``return_logits=False``); ``log_probs``
    ``(batch, n)`` float32, the log-probabilities of the response tokens (only with ``response_length``);
    ``values`` ``(batch, n)`` float32.
    """

    logits: torch.Tensor | None
    log_probs: torch.Tensor | None
    values: torch.Tensor
    router_loss: torch.Tensor | None = None  # with router_loss=True: the routers' load-balancing loss


class VLModelWithValueHead(ScalarHeadModel):
    """A family's model (or its PEFT/LoRA wrapper) with a scalar value head on every position (``v_head``).

    Generated adapters may subclass it with ``vl_model`` set; otherwise pass ``vl_model=``.
    """

    head_attribute = "v_head"
    head_file = VALUE_HEAD
    config_file = VALUE_CONFIG
    file_format = FORMAT
    mapper_slot = "value_model"
    what = "value model"

    def __init__(self, model: nn.Module, vl_model: type[VLModel] | None = None, v_head: nn.Linear | None = None):
        super().__init__(model, vl_model, v_head)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's LM head on final hidden states, with the final-logit soft-capping ``tanh(x / c) * c`` where
        the model's own ``forward`` applies it (PaliGemma with a Gemma 2 text config; Gemma 3's multimodal class
        does not)."""
        base = unwrap(self.model)
        logits = base.get_output_embeddings()(hidden)
        cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        if cap and _forward_caps_logits(type(base)):
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_length: int | None = None,
        temperature: float = 1.0,
        return_logits: bool = True,
        suppress_tokens: Sequence[int] | None = None,
        router_loss: bool = False,
        **inputs: Any,
    ) -> ValueHeadOutput:
        """Logits, log-probs and values of a batch of prompts followed by responses.

        With ``response_length = R``, the last ``R`` tokens of ``input_ids`` are the responses (a rollout: the
        left-padded prompts, then the generated tokens; padding after a row's end is the caller's to mask).
        The scored positions are then ``L - R - 1 .. L - 2``: ``logits[:, i]`` predicts ``input_ids[:, L - R + i]``,
        ``log_probs[:, i]`` is that token's log-probability under ``softmax(logits / temperature)`` (the
        sampling distribution), ``values[:, i]`` the value of the same state. Without ``response_length`` every
        position is scored (``logits[:, t]`` predicts token ``t + 1``) and ``log_probs`` is ``None``.
        ``suppress_tokens`` (generation's setting of the same name) get logit ``-inf`` in the returned logits and the
        log-probs: the distribution generation sampled from. Other keyword arguments (image inputs,
        ``token_type_ids``, ...) go to the model as they are.
        """
        inputs.pop("labels", None)
        length = input_ids.shape[1]
        if response_length is not None and not 0 < response_length < length:
            raise ValueError(
                f"response_length must be in 1..{length - 1} (a prompt token first), got {response_length}"
            )
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        if router_loss:
            inputs["output_router_logits"] = True
        hidden, router_logits = backbone_pass(self.model, inputs)
        if hidden.shape[:2] != input_ids.shape:
            raise ValueError(f"hidden states {tuple(hidden.shape)} do not match input_ids {tuple(input_ids.shape)}")
        if response_length is not None:
            hidden = hidden[:, length - response_length - 1 : length - 1]
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
        logits = self.lm_logits(hidden) if return_logits or response_length is not None else None
        # Ids past the head's width have no logit to suppress: the head never produces them (Molmo2 keeps its image
        # tokens in extra embedding rows only)
        suppress = [i for i in suppress_tokens or () if i < (logits.shape[-1] if logits is not None else 0)]
        if logits is not None and suppress:
            logits = logits.index_fill(-1, torch.as_tensor(suppress, device=logits.device), float("-inf"))
        log_probs = None
        if response_length is not None:
            log_probs = token_log_probs(logits, input_ids[:, length - response_length :], temperature)
            if not return_logits:
                logits = None
        balance = router_balance_loss(self.model, router_logits, attention_mask) if router_loss else None
        return ValueHeadOutput(logits=logits, log_probs=log_probs, values=values, router_loss=balance)

    def description(self) -> dict[str, Any]:  # noqa: D102
        return {**super().description(), "positions": "every token (the value of the state before the next token)"}
