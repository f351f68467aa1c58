"""Trainers: TRL 1.x's SFTTrainer and DPOTrainer, with images encoded once per step.

When no weight that encodes images is trained (frozen tower and projector, e.g. LoRA on the
language model), the images of a batch go through the vision tower once, under ``no_grad``; the
result reaches the model through transformers' ``mm_encoder_outputs`` argument. For DPO the same
features serve chosen, rejected and the reference pass (TRL runs the tower four times per image
and backpropagates through it).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.utils import ModelOutput
from trl import DPOTrainer, SFTTrainer
from trl.trainer.utils import hash_module

from resonance.base.model import VLModel, unwrap
from resonance.base.processor import VLProcessor


def _repeat(value: Any, copies: int) -> Any:
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        return torch.cat([value] * copies)
    return type(value)(list(value) * copies)


def _reusable_features(encoded: ModelOutput, copies: int) -> ModelOutput:
    """The image-encoder output the language model reads, repeated ``copies`` times along the batch.

    Kept: ``pooler_output`` (the projected image features every family reads) and any extra
    top-level tensors or tensor tuples (Qwen3-VL's ``deepstack_features``); ``last_hidden_state``
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
        elif isinstance(value, tuple | list) and all(isinstance(v, torch.Tensor) for v in value):
            kept[key] = type(value)(_repeat(v, copies) for v in value)  # one tensor per layer (deepstack)
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
        with torch.no_grad():
            encoded = base.get_image_features(**image_kwargs, return_dict=True)
        # Other image inputs stay (Qwen's image_grid_thw places the rope positions of image tokens).
        model_inputs = {k: (_repeat(v, copies) if k in names else v) for k, v in inputs.items() if k != "pixel_values"}
        model_inputs["mm_encoder_outputs"] = {"image": _reusable_features(encoded, copies)}
        return model_inputs


class VLSFTTrainer(_ImageEncodingMixin, SFTTrainer):
    """SFT on TRL's SFTTrainer with our collator (labels on assistant turns only)."""

    def __init__(self, *args: Any, vl_model: type[VLModel], vl_processor: VLProcessor, **kwargs: Any):
        self._bind_adapter(vl_model, vl_processor)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        inputs = self._image_model_inputs(model, inputs, copies=1)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class VLDPOTrainer(_ImageEncodingMixin, DPOTrainer):
    """DPO on TRL's DPOTrainer (same losses and metrics), with one vision pass per step.

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

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, self._image_model_inputs(model, inputs, copies=2))

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = self._image_model_inputs(model, inputs, copies=2)
        return super()._compute_loss(model, inputs, return_outputs)
