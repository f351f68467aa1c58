"""Image-feature reuse: a batch's images (and videos) encoded once, without gradients, when no weight that encodes
images trains.

When the tower and projector are frozen (e.g. LoRA on the language model), the images of a batch go through the
vision tower once, under ``no_grad``; the result reaches the model through transformers' ``mm_encoder_outputs``
argument (or the spec's ``image.features_input``); a batch's videos likewise, through the model's own
``get_video_features``, as ``mm_encoder_outputs["video"]``. For DPO the same features serve chosen, rejected and the
reference pass (TRL runs the tower four times per image and backpropagates through it); SFT, RM and PPO use it too.

Several processes: a process whose batch holds no image still runs the image encoder, on one placeholder image,
when the others may be running it and would wait for it (:meth:`ImageEncodingMixin._idle_encoder`). With sharded
weights (FSDP, ZeRO-3) the images always go through the model's forward (nothing is precomputed outside it).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from resonance.algorithms.batch_rows import expanded, image_inputs_of
from resonance.base.model import VLModel, unwrap
from resonance.base.processor import VLProcessor

logger = logging.getLogger("resonance")


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


def _floating_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every floating-point tensor in an encoder output (a tensor, a ModelOutput or dict, nested lists)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):  # ModelOutput is a dict
        for item in value.values():
            yield from _floating_tensors(item)
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _floating_tensors(item)


def _encode(vl_model: type[VLModel], base: torch.nn.Module, image_kwargs: dict[str, Any]) -> Any:
    """The images' encoding as the language model reads it: the spec's ``image.features_input`` (the projected
    tower output), else transformers' ``get_image_features``."""
    if vl_model.image_features_input is not None:
        return vl_model.encode_images(base, image_kwargs)
    return base.get_image_features(**image_kwargs, return_dict=True)


def _with_image_features(inputs: dict[str, Any], features: ModelOutput) -> dict[str, Any]:
    """``inputs`` with the images' pixels replaced by their encoded ``features`` (transformers' ``mm_encoder_outputs``);
    their other inputs stay (Qwen's image_grid_thw places the rope positions)."""
    model_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    model_inputs["pixel_values"] = None  # explicitly, as _image_model_inputs gives it
    model_inputs["mm_encoder_outputs"] = {"image": features}
    return model_inputs


@dataclass
class GroupFeatures:
    """Prompt groups' images encoded once, for every later pass over their rows (a GRPO step's old-policy, reference
    and loss passes): the model whose encoder ran, its output (one entry per image: the groups' images in order),
    and each group's first image in it and number of images."""

    base: torch.nn.Module
    features: ModelOutput
    first: dict[int, int]
    count: dict[int, int]

    def inputs_of_rows(
        self, base: torch.nn.Module, inputs: dict[str, Any], groups: Sequence[int], images: Sequence[int]
    ) -> dict[str, Any] | None:
        """``inputs`` of rows of these groups (``groups``: each row's, ``images``: its image count) with their
        groups' features, or None where they cannot serve: another model's encoder, a group not among these or a
        row whose image count is not its group's (a tool's images), videos, or features that are not one entry per
        image."""
        if base is not self.base or "pixel_values" not in inputs or _VIDEO_PIXELS in inputs:
            return None
        if any(self.count.get(group) != count for group, count in zip(groups, images, strict=True)):
            return None
        index = [self.first[group] + i for group, count in zip(groups, images, strict=True) for i in range(count)]
        try:
            features = expanded(self.features, index, sum(self.count.values()))
        except NotImplementedError:
            return None
        return _with_image_features(inputs, features)


def weights_sharded(accelerator: Any) -> bool:
    """Whether the accelerator's weights are shards (FSDP, in one process too, as DTensors; DeepSpeed ZeRO-3); None:
    no accelerator. Sharded strategies gather a module's weights as it runs, in the order the model's forward runs
    them: features computed outside that forward would meet the shards of the weights FSDP gathers only for the
    whole model, and gather in another order than a process whose batch has no image
    (:meth:`ImageEncodingMixin._idle_encoder`); a save must gather them first."""
    from accelerate.utils import DistributedType

    if accelerator is None:
        return False
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def _placeholder_conversation() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "."}]},
    ]


# The videos' pixels as transformers' video forwards name them (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V, Gemma 4).
_VIDEO_PIXELS = "pixel_values_videos"


def _encode_videos(base: torch.nn.Module, inputs: dict[str, Any], names: list[str]) -> Any:
    """transformers' ``get_video_features`` on the batch's video inputs (``names``), as the forward calls it: the
    model's own, or its multimodal model's (Gemma 4 defines it on ``model.model`` only)."""
    owner = base if hasattr(type(base), "get_video_features") else base.model
    taken = inspect.signature(type(owner).get_video_features).parameters
    return owner.get_video_features(**{k: inputs[k] for k in names if k in inputs and k in taken}, return_dict=True)


def _in_token_order(image: ModelOutput, video: ModelOutput, is_video: torch.Tensor) -> ModelOutput:
    """One image-encoder output holding the images' and the videos' features in the order of their tokens, for a
    family whose videos expand into its image token (GLM-4.1V): its forward fills every image token from the image
    features, and refuses a batch holding both otherwise. ``is_video``: for each image token of the batch, in order,
    whether it is a video's; those of the rows the features belong to come first."""
    extra = sorted(set(image) - {"pooler_output"})
    if extra:
        raise ValueError(f"cannot merge image and video features in token order: the encoder also returns {extra}")
    image_features, video_features = torch.cat(image.pooler_output), torch.cat(video.pooler_output)
    is_video = is_video[: len(image_features) + len(video_features)]
    merged = image_features.new_empty(len(is_video), image_features.shape[-1])
    merged[~is_video] = image_features
    merged[is_video] = video_features.to(merged.dtype)
    return type(image)(pooler_output=(merged,))


class ImageEncodingMixin:
    """Turns a batch's image inputs into model inputs, encoding frozen images once."""

    vl_model: type[VLModel]
    vl_processor: VLProcessor
    _placeholder_inputs: dict[str, Any] | None = None
    _by_group_refused: str | None = None  # why a batch's images could not be encoded once per group (said once)

    def _bind_adapter(self, vl_model: type[VLModel], vl_processor: VLProcessor) -> None:
        self.vl_model = vl_model
        self.vl_processor = vl_processor

    def _encoder_frozen_and_reused(self, base: torch.nn.Module) -> bool:
        """Whether no weight that encodes images trains and the family's forward takes their features."""
        return self.vl_model.image_encoder_frozen(base) and self.vl_model.reuses_image_features(base)

    def _image_model_inputs_by_group(
        self, model: torch.nn.Module, inputs: dict[str, Any], groups: Sequence[int], images: Sequence[int]
    ) -> dict[str, Any]:
        """:meth:`_image_model_inputs` (one copy) for a batch whose rows of one group hold the same images (a GRPO
        group's completions): ``groups`` gives each row's group, ``images`` its image count. Only the first row of
        each group has its images encoded, and the group's other rows get its features. Where the images' inputs
        cannot be taken by row (spec image.inputs layouts: tiles), or the features are not one entry per image,
        every row's images are encoded, from then on (the reason said once in the log)."""
        first: dict[int, int] = {}
        source = [first.setdefault(group, row) for row, group in enumerate(groups)]
        keep = sorted(first.values())
        base = unwrap(model)
        if (
            self._by_group_refused is not None
            or len(keep) == len(groups)
            or "pixel_values" not in inputs
            or _VIDEO_PIXELS in inputs
            or self.vl_model.image_features_input is not None
            or not self._encoder_frozen_and_reused(base)
            or weights_sharded(getattr(self, "accelerator", None))
        ):
            return self._image_model_inputs(model, inputs, copies=1)
        processor = self.vl_processor
        try:
            if any(images[row] != images[source[row]] for row in range(len(groups))):
                raise NotImplementedError("rows of one group hold different numbers of images")
            layouts = {item.name: item.layout for item in processor.image_inputs}
            picked = image_inputs_of(inputs, layouts, processor.image_grid_input, keep, images)
            with torch.no_grad():
                encoded = _reusable_features(_encode(self.vl_model, base, picked), 1)
            starts = {row: sum(images[kept] for kept in keep if kept < row) for row in keep}
            index = [starts[source[row]] + i for row in range(len(groups)) for i in range(images[row])]
            features = expanded(encoded, index, sum(images[row] for row in keep))
        except NotImplementedError as reason:
            self._by_group_refused = str(reason)
            logger.info("%s: each row's images are encoded, not each group's (%s)", type(base).__name__, reason)
            return self._image_model_inputs(model, inputs, copies=1)
        return _with_image_features(inputs, features)

    def _image_model_inputs(self, model: torch.nn.Module, inputs: dict[str, Any], copies: int) -> dict[str, Any]:
        """Inputs for ``copies`` repetitions of the batch's images and videos (chosen + rejected: 2)."""
        names = self.vl_processor.visual_input_names()  # the images' inputs, then the videos'
        if "pixel_values" not in inputs and _VIDEO_PIXELS not in inputs:
            return inputs
        base = unwrap(model)
        encoded_once = self._encoder_frozen_and_reused(base)
        # Videos that expand into the image token, next to images: the forward would read every image token as an
        # image's, so the features go to it merged in token order, computed here (with gradients where they train).
        both = "pixel_values" in inputs and _VIDEO_PIXELS in inputs
        merged = both and self.vl_processor.video_tokens_need_types() and self.vl_model.reuses_image_features(base)
        sharded = weights_sharded(getattr(self, "accelerator", None))
        if merged and sharded:
            raise ValueError(
                f"{type(self.vl_processor).__name__}: a batch holding images and videos, whose videos expand into the "
                "image token, needs their features computed outside the forward, which sharded weights (FSDP, ZeRO-3) "
                "do not allow; batch images and videos apart, or train without sharding"
            )
        if not merged and (not encoded_once or sharded):
            return {k: (_repeat(v, copies) if k in names else v) for k, v in inputs.items()}
        features_input = self.vl_model.image_features_input
        if features_input is not None:  # spec image.features_input: forward takes the features, not the images
            image_kwargs = {k: inputs[k] for k in names if k in inputs}
            with torch.no_grad():
                encoded = _encode(self.vl_model, base, image_kwargs)
            model_inputs = {k: v for k, v in inputs.items() if k not in names}
            model_inputs[features_input] = _repeat(encoded, copies)
            return model_inputs
        # Other image and video inputs stay (Qwen's image_grid_thw / video_grid_thw place the rope positions).
        pixels = ("pixel_values", _VIDEO_PIXELS)
        model_inputs = {k: (_repeat(v, copies) if k in names else v) for k, v in inputs.items() if k not in pixels}
        encoder_outputs = {}
        no_grad = torch.no_grad() if encoded_once else contextlib.nullcontext()  # merged, a trained tower has grads
        if "pixel_values" in inputs:
            image_kwargs = {k: inputs[k] for k in self.vl_processor.image_input_names() if k in inputs}
            with no_grad:
                encoded = _encode(self.vl_model, base, image_kwargs)
            model_inputs["pixel_values"] = None  # explicitly: some forwards take it without a default (InstructBLIP)
            encoder_outputs["image"] = _reusable_features(encoded, copies)
        if _VIDEO_PIXELS in inputs:  # transformers' get_video_features, as the forward would call it
            with no_grad:
                encoded = _encode_videos(base, inputs, self.vl_processor.video_input_names())
            model_inputs[_VIDEO_PIXELS] = None
            encoder_outputs["video"] = _reusable_features(encoded, copies)
        if merged:
            is_video = self.vl_processor.video_token_mask(inputs)[
                inputs["input_ids"] == self.vl_processor.image_token_id
            ]
            encoder_outputs["image"] = _in_token_order(encoder_outputs["image"], encoder_outputs["video"], is_video)
            del encoder_outputs["video"]
        model_inputs["mm_encoder_outputs"] = encoder_outputs
        return model_inputs

    # -- a process without images, among several ------------------------------------------------------------

    def _encoder_runs_everywhere(self, model: torch.nn.Module, encoder_model: torch.nn.Module) -> bool:
        """Whether every process must run the image encoder every step (``model``: what the trainer runs, wrapped
        for several processes; ``encoder_model``: the model holding the encoder). Under FSDP and DeepSpeed, whose
        processes gather a module's weights from each other as it runs, so that a process skipping the encoder
        leaves the others waiting; under DDP when the encoder's weights train and DDP does not look for unused
        weights itself (``find_unused_parameters`` off, the Trainer's choice under gradient checkpointing): it waits
        for their gradients from every process. With ``find_unused_parameters`` DDP needs no pass, and takes none:
        it would count the pass's gradients twice."""
        from accelerate.utils import DistributedType

        accelerator = getattr(self, "accelerator", None)
        if accelerator is None or accelerator.num_processes < 2:
            return False
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return True
        trains = not self.vl_model.image_encoder_frozen(unwrap(encoder_model))
        return trains and not getattr(model, "find_unused_parameters", True)

    def _placeholder_image_inputs(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The image inputs of one small placeholder image, as the family's processor makes them (made once)."""
        if self._placeholder_inputs is None:
            from PIL import Image

            image = Image.new("RGB", (64, 64), (127, 127, 127))
            batch = self.vl_processor.process_batch_conv([_placeholder_conversation()], [[image]])
            self._placeholder_inputs = {k: batch[k] for k in self.vl_processor.image_input_names() if k in batch}
        return {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
            for k, v in self._placeholder_inputs.items()
        }

    @contextlib.contextmanager
    def _idle_encoder(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        encoder_model: torch.nn.Module | None = None,
        generation: bool = False,
    ) -> Iterator[IdleEncoding]:
        """Around the forward passes of a batch without images, on a process that must still run the image encoder
        (:meth:`_encoder_runs_everywhere`): the encoder runs on a placeholder image when the first forward reaches
        the language model, so inside the model's forward (where FSDP has gathered the weights the model keeps
        outside its wrapped layers), at the point where a batch with images runs it. Where its output is in the
        autograd graph, the yielded :class:`IdleEncoding`'s ``term`` is then ``0 * (sum of its output)``, to add to
        the loss, so the backward pass runs through the encoder as it does for a batch with images: zero gradients
        for its trained weights, and the loss and every other gradient unchanged (a product with zero adds exactly
        0).

        Around ``generate`` (``generation``), a batch with images runs the encoder where transformers' ``generate``
        does: before the first forward pass for the models that take its output as a forward input
        (``mm_encoder_outputs``), so the placeholder pass runs as that forward starts, not at the language model
        (after the text embeddings: the processes would gather other weights at the same time)."""
        idle = IdleEncoding()
        encoder_model = unwrap(model) if encoder_model is None else unwrap(encoder_model)
        names = self.vl_processor.visual_input_names()
        if any(inputs.get(name) is not None for name in names) or not self._encoder_runs_everywhere(
            model, encoder_model
        ):
            yield idle
            return

        def encode_placeholder(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            if idle.ran:
                return
            idle.ran = True
            parameter = next(self.vl_model.get_vision_tower(encoder_model).parameters())
            image_kwargs = self._placeholder_image_inputs(parameter.device, parameter.dtype)
            # In the forward's own grad mode, as a batch with images runs the encoder, and into the loss wherever it
            # is in the autograd graph (trained weights, or inputs made to require gradients for gradient
            # checkpointing): FSDP gathers a layer's weights again in the backward pass that reaches it. Only what the
            # language model reads, as for a batch with images: a backward pass through more of the encoder (LLaVA's
            # last layer, past the layer it reads) gathers more under ZeRO-3 than the others' does.
            output = _encode(self.vl_model, encoder_model, image_kwargs)
            read = _reusable_features(output, 1) if isinstance(output, ModelOutput) else output
            encoded = list(_floating_tensors(read))
            if any(t.requires_grad for t in encoded):
                idle.term = sum(t.sum() for t in encoded if t.requires_grad) * 0.0

        hooked = encoder_model.get_submodule(self.vl_model.language_model_path)
        if generation and _encodes_before_forward(encoder_model):
            hooked = encoder_model
        # ahead of the hooks the sharding strategy put on the module (DeepSpeed ZeRO-3 records each module as its
        # forward starts, and checks every process recorded the same order; its start-of-forward hook on the
        # model's root runs collectives), as a batch with images runs its encoder before that module's forward
        handle = hooked.register_forward_pre_hook(encode_placeholder, with_kwargs=True, prepend=True)
        try:
            yield idle
        finally:
            handle.remove()


def _encodes_before_forward(model: torch.nn.Module) -> bool:
    """Whether transformers' ``generate`` encodes this model's images before its first forward pass (and passes
    the features as ``mm_encoder_outputs``) rather than leaving it to the forward (transformers 5.x)."""
    supports = getattr(model, "_supports_mm_encoder_outputs", None)
    return supports is not None and supports() and "image" in getattr(model, "input_modalities", ())


@dataclass
class IdleEncoding:
    """What :meth:`ImageEncodingMixin._idle_encoder` did: whether the placeholder pass ran, and the term to add to
    the loss (None: nothing to add)."""

    ran: bool = False
    term: torch.Tensor | None = None


def add_to_loss(result: Any, term: torch.Tensor | None) -> Any:
    """``compute_loss``'s result (a loss, or ``(loss, outputs)``) with ``term`` added to the loss."""
    if term is None:
        return result
    if isinstance(result, tuple):
        return (result[0] + term, *result[1:])
    return result + term
