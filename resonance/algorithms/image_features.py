"""Image-feature reuse: a batch's images encoded once, without gradients, when no weight that encodes images trains.

When the tower and projector are frozen (e.g. LoRA on the language model), the images of a batch go through the
vision tower once, under ``no_grad``; the result reaches the model through transformers' ``mm_encoder_outputs``
argument (or the spec's ``image.features_input``). For DPO the same features serve chosen, rejected and the
reference pass (TRL runs the tower four times per image and backpropagates through it); SFT, RM and PPO use it too.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.utils import ModelOutput

from resonance.base.model import VLModel, unwrap
from resonance.base.processor import VLProcessor


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


class ImageEncodingMixin:
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
