"""Trainers: TRL 1.x's SFTTrainer and DPOTrainer, with images encoded once per step.

When no weight that encodes images is trained (frozen tower and projector, e.g. LoRA on the
language model), the images of a batch go through the vision tower once, under ``no_grad``; the
result reaches the model through transformers' ``mm_encoder_outputs`` argument. For DPO the same
features serve chosen, rejected and the reference pass (TRL runs the tower four times per image
and backpropagates through it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput
from trl import DPOConfig, DPOTrainer, SFTTrainer
from trl.trainer.utils import hash_module

from resonance.base.model import VLModel, unwrap
from resonance.base.processor import VLProcessor
from resonance.base.shared_prompt import PairLayout, install_shared_prompt, plan_pairs, sharing


def _repeat(value: Any, copies: int) -> Any:
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        return torch.cat([value] * copies)
    return type(value)(list(value) * copies)


def _is_tensor_or_tensors(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, tuple | list) and all(isinstance(v, torch.Tensor) for v in value)
    )


def _reusable_features(encoded: ModelOutput, copies: int) -> ModelOutput:
    """The image-encoder output the language model reads, repeated ``copies`` times along the batch.

    Kept: ``pooler_output`` (the projected image features every family reads) and any extra
    top-level tensors or per-layer lists (Qwen3-VL's ``deepstack_features``: per layer, one tensor per
    image, repeated in the same image order as ``pooler_output``); ``last_hidden_state``
    only where there is no pooled output. Nested encoder outputs (InstructBLIP's ``vision_outputs``)
    and hidden states/attentions are only echoed back by ``forward``, so they are dropped.
    """
    kept: dict[str, Any] = {}
    for key, value in encoded.items():
        if key in ("hidden_states", "attentions") or isinstance(value, ModelOutput):
            continue
        if key == "last_hidden_state" and encoded.get("pooler_output") is not None:
            continue
        if key in ("pooler_output", "last_hidden_state") or isinstance(value, torch.Tensor):
            kept[key] = _repeat(value, copies)  # a tensor, or a list with one entry per image (Idefics3)
        elif isinstance(value, tuple | list) and all(_is_tensor_or_tensors(v) for v in value):
            # One entry per layer (deepstack): a tensor over all images, or one tensor per image
            # (Qwen3-VL splits each layer's features by image); each is repeated like pooler_output.
            kept[key] = type(value)(_repeat(v, copies) for v in value)
    return type(encoded)(**kept)


class _ImageEncodingMixin:
    """Turns a batch's image inputs into model inputs, encoding frozen images once."""

    vl_model: type[VLModel]
    vl_processor: VLProcessor

    def _bind_adapter(self, vl_model: type[VLModel], vl_processor: VLProcessor) -> None:
        self.vl_model = vl_model
        self.vl_processor = vl_processor

    def _image_model_inputs(self, model: torch.nn.Module, inputs: dict[str, Any], copies: int) -> dict[str, Any]:
        """Inputs for ``copies`` repetitions of the batch's images (chosen + rejected: 2)."""
        names = self.vl_processor.image_input_names()
        if "pixel_values" not in inputs:
            return inputs
        base = unwrap(model)
        if not (self.vl_model.image_encoder_frozen(base) and self.vl_model.reuses_image_features(base)):
            return {k: (_repeat(v, copies) if k in names else v) for k, v in inputs.items()}
        image_kwargs = {k: inputs[k] for k in names if k in inputs}
        features_input = self.vl_model.image_features_input
        if features_input is not None:  # spec image.features_input: forward takes the features, not the images
            with torch.no_grad():
                features = self.vl_model.encode_images(base, image_kwargs)
            model_inputs = {k: v for k, v in inputs.items() if k not in names}
            model_inputs[features_input] = _repeat(features, copies)
            return model_inputs
        with torch.no_grad():
            encoded = base.get_image_features(**image_kwargs, return_dict=True)
        # Other image inputs stay (Qwen's image_grid_thw places the rope positions of image tokens).
        model_inputs = {k: (_repeat(v, copies) if k in names else v) for k, v in inputs.items() if k != "pixel_values"}
        model_inputs["pixel_values"] = None  # explicitly: some forwards take it without a default (InstructBLIP)
        model_inputs["mm_encoder_outputs"] = {"image": _reusable_features(encoded, copies)}
        return model_inputs


def fused_head_backbone(model: torch.nn.Module | None) -> None:
    """Let TRL's fused LM head run on a model that has no backbone module (InstructBLIP).

    TRL 1.x patches ``forward`` so that ``fused_lm_head=True`` takes the final hidden states from
    ``model.base_model(...).last_hidden_state`` and projects only the labelled positions through the LM
    head. transformers' ``base_model`` is ``getattr(model, model.base_model_prefix, model)``: the model
    itself when the class has no backbone attribute (InstructBlipForConditionalGeneration: prefix "blip",
    no such module), whose output has logits and no ``last_hidden_state``, so TRL fails. For such models,
    while a fused call runs, that attribute names a function that runs the model's own forward with the
    output embeddings swapped for an identity: its "logits" are the final hidden states. Other models are
    left alone.
    """
    if model is None:
        return
    base = unwrap(model)
    prefix = base.base_model_prefix
    if base.base_model is not base or not prefix or getattr(base.forward, "_resonance_backbone", False):
        return
    fused_forward = base.forward  # TRL's patched forward

    def backbone(*args: Any, **kwargs: Any) -> BaseModelOutput:
        head = base.get_output_embeddings()
        base.set_output_embeddings(torch.nn.Identity())
        try:
            return BaseModelOutput(last_hidden_state=fused_forward(*args, **kwargs).logits)
        finally:
            base.set_output_embeddings(head)

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


class VLSFTTrainer(_ImageEncodingMixin, SFTTrainer):
    """SFT on TRL's SFTTrainer with our collator (labels on assistant turns only)."""

    def __init__(self, *args: Any, vl_model: type[VLModel], vl_processor: VLProcessor, **kwargs: Any):
        self._bind_adapter(vl_model, vl_processor)
        super().__init__(*args, **kwargs)
        fused_head_backbone(self.model)
        vl_model.batch_vision_attention(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        inputs = self._image_model_inputs(model, inputs, copies=1)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@dataclass
class VLDPOConfig(DPOConfig):
    """TRL's DPOConfig and how our trainer lays out the pairs."""

    shared_prompt: bool = field(
        default=True,
        metadata={
            "help": "Run each pair's chosen and rejected answers in one row over a single copy of their prompt "
            "(and its image tokens), with an attention mask that keeps them apart: the same log-probs as two "
            "rows, for fewer tokens. Needs sdpa or eager attention and right padding; families whose attention "
            "is not plain causal (spec shared_prompt: false) always run two rows."
        },
    )


class VLDPOTrainer(_ImageEncodingMixin, DPOTrainer):
    """DPO on TRL's DPOTrainer (same losses and metrics), with one vision pass per step.

    Each pair runs as one row over its shared prompt where the family allows it (see
    :mod:`resonance.base.shared_prompt`), for the policy and the reference alike.

    ``precompute_ref_log_probs=True`` works for image datasets too (TRL refuses it for them): the
    reference log-probs of every row are computed once before training, with TRL's own cached pass
    and our collator, and training then skips the reference forward.
    """

    def __init__(self, *args: Any, vl_model: type[VLModel], vl_processor: VLProcessor, **kwargs: Any):
        self._bind_adapter(vl_model, vl_processor)
        config = kwargs.get("args")
        precompute = bool(config is not None and config.precompute_ref_log_probs)
        if precompute:
            config.precompute_ref_log_probs = False  # TRL's __init__ refuses image datasets; done below instead
        super().__init__(*args, **kwargs)
        fused_head_backbone(self.model)
        fused_head_backbone(self.ref_model)
        install_shared_prompt(self.model, vl_model.position_ids_kind)
        install_shared_prompt(self.ref_model, vl_model.position_ids_kind)
        for model in (self.model, self.ref_model):
            if model is not None:
                vl_model.batch_vision_attention(model)
        if precompute:
            config.precompute_ref_log_probs = True
            self._precompute_images()

    def _precompute_images(self) -> None:
        """Add ``ref_chosen_logps``/``ref_rejected_logps`` columns to the train and eval datasets."""
        self.precompute_ref_logps = True
        self._precompute_model_hash = hash_module(self.ref_model or self.model)
        self._precompute_engine = None
        size = self.args.precompute_ref_batch_size
        self.train_dataset = self._precompute_ref_logps(
            self.train_dataset, "train", size or self.args.per_device_train_batch_size
        )
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                name: self._precompute_ref_logps(data, name, size or self.args.per_device_eval_batch_size)
                for name, data in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = self._precompute_ref_logps(
                self.eval_dataset, "eval", size or self.args.per_device_eval_batch_size
            )

    def pair_layout(self, model: torch.nn.Module, inputs: dict[str, Any]) -> PairLayout | None:
        """The shared-prompt layout of this batch, or ``None`` to run it as chosen rows then rejected rows."""
        base = unwrap(model)
        if not getattr(self.args, "shared_prompt", True) or not self.vl_model.shares_prompt:
            return None
        if base.config._attn_implementation not in ("sdpa", "eager"):
            return None  # flash-attention takes no custom mask
        return plan_pairs(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["completion_mask"],
            self.vl_processor.placeholder_token_ids(),
            multiple_of=self.args.pad_to_multiple_of or 1,
        )

    def compute_ref_log_probs(self, model, inputs):
        layout = self.pair_layout(model, inputs)
        inputs = self._image_model_inputs(model, inputs, copies=1 if layout else 2)
        with sharing(layout, model, self.ref_model):
            return super().compute_ref_log_probs(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        layout = self.pair_layout(model, inputs)
        inputs = self._image_model_inputs(model, inputs, copies=1 if layout else 2)
        with sharing(layout, model, self.ref_model):
            return super()._compute_loss(model, inputs, return_outputs)
