"""TRL's fused LM head on models whose class has no backbone module (InstructBLIP); verified with trl 1.16."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput


@contextlib.contextmanager
def output_embeddings_as_identity(model: torch.nn.Module) -> Iterator[None]:
    """While the block runs, ``model``'s output embeddings (the LM head) are an identity: its "logits" are the
    final hidden states. For models whose class has no backbone module to call instead (InstructBLIP)."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def fused_head_backbone(model: torch.nn.Module | None) -> None:
    """Let TRL's fused LM head run on a model that has no backbone module (InstructBLIP).

    TRL 1.x patches ``forward`` so that ``fused_lm_head=True`` takes the final hidden states from
    ``model.base_model(...).last_hidden_state`` and projects only the labelled positions through the LM
    head. transformers' ``base_model`` is ``getattr(model, model.base_model_prefix, model)``: the model
    itself when the class has no backbone attribute (InstructBlipForConditionalGeneration: prefix "blip",
    no such module), whose output has logits and no ``last_hidden_state``, so TRL fails. For such models,
    while a fused call runs, that attribute names a function that runs the model's own forward with the
    output embeddings swapped for an identity: its "logits" are the final hidden states. Other models are
    left alone. ``model`` is the transformers model (unwrapped from PEFT and distributed wrappers).
    """
    if model is None:
        return
    base = model
    prefix = base.base_model_prefix
    if base.base_model is not base or not prefix or getattr(base.forward, "_resonance_backbone", False):
        return
    fused_forward = base.forward  # TRL's patched forward

    def backbone(*args: Any, **kwargs: Any) -> BaseModelOutput:
        with output_embeddings_as_identity(base):
            return BaseModelOutput(last_hidden_state=fused_forward(*args, **kwargs).logits)

    @functools.wraps(fused_forward)
    def forward(*args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        if not fused_lm_head:
            return fused_forward(*args, **kwargs)
        base.__dict__[prefix] = backbone  # what model.base_model returns during this call only
        try:
            return fused_forward(*args, fused_lm_head=True, **kwargs)
        finally:
            del base.__dict__[prefix]

    forward._resonance_backbone = True  # type: ignore[attr-defined]
    base.forward = forward
