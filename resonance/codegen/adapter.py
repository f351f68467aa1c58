"""What a spec compiles into: the adapter's classes, each class attribute taken from one spec field.

A generated class writes an attribute only where the spec's value differs from the schema's default; the base
classes (``resonance.base``) hold those defaults, and a test keeps the two equal. So an adapter holds the facts
about its family and the seed's class names, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from resonance.codegen.hooks import SLOTS
from resonance.codegen.schema import ModelSpec


@dataclass(frozen=True)
class Call:
    """A call in generated code, e.g. ``api.ImageInput("pixel_values", "per_image")``; arguments are literals."""

    func: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Name:
    """A name in generated code (a class the adapter defines), written as is; validated as an identifier."""

    name: str


@dataclass(frozen=True)
class Attribute:
    """Class attribute ``name`` holds ``convert(spec.<field>)``."""

    name: str
    field: str  # dotted path in the spec
    convert: Callable[[Any], Any] = lambda value: value


def _image_input(item: Any) -> Call:
    """``api.ImageInput(name, layout[, from_prompt=True])`` for one spec ``image.inputs`` entry."""
    kwargs = (("from_prompt", True),) if item.source == "prompt" else ()
    return Call("api.ImageInput", (item.name, item.layout), kwargs)


def _video(video: Any) -> Call | None:
    """``api.VideoSupport(token, inputs, ...)`` for a spec ``video`` section, keywords only where they differ from
    the schema's defaults; None (no video) where the spec has none."""
    if video is None:
        return None
    inputs = [Call("api.ImageInput", (item.name, item.layout)) for item in video.inputs]
    defaults = type(video).model_fields
    sampling_defaults = type(video.sampling).model_fields
    kwargs = [
        (name, getattr(video, name))
        for name in ("placeholder", "grid_input", "frames_input", "processor_kwargs", "with_images", "chat_template")
        if getattr(video, name) != defaults[name].get_default(call_default_factory=True)
    ]
    kwargs += [
        (name, getattr(video.sampling, name))
        for name in ("fps", "num_frames", "frames_fps", "equal_frames")
        if getattr(video.sampling, name) != sampling_defaults[name].get_default(call_default_factory=True)
    ]
    return Call("api.VideoSupport", (video.token, inputs), tuple(kwargs))


ATTRIBUTES: dict[str, tuple[Attribute, ...]] = {
    "model": (
        Attribute("hf_model_class", "model_class"),
        Attribute("trust_remote_code", "trust_remote_code"),
        Attribute("language_model_path", "modules.language_model"),
        Attribute("vision_tower_path", "modules.vision_tower"),
        Attribute("projector_path", "modules.projector"),
        Attribute("default_lora_target", "lora.targets"),
        Attribute("default_lora_parameters", "lora.parameters"),
        Attribute("router_paths", "moe.router"),
        Attribute("router_aux_loss", "moe.aux_loss"),
        Attribute("default_generation_kwargs", "generation"),
        Attribute("supports_flash_attention", "flash_attention"),
        Attribute("position_ids_kind", "position_ids"),
        Attribute("image_features_input", "image.features_input"),
        Attribute("shares_prompt", "shared_prompt"),
        Attribute("batched_vision_attention", "image.batched_attention"),
    ),
    "processor": (
        Attribute("hf_processor_class", "processor_class"),
        Attribute("image_placeholder", "image.placeholder"),
        Attribute("image_placeholder_position", "image.position"),
        Attribute("image_token", "image.token"),
        Attribute("image_inputs", "image.inputs", lambda items: [_image_input(item) for item in items]),
        Attribute("image_grid_input", "image.grid_input"),
        Attribute("multi_image", "image.multi_image"),
        Attribute("images_required", "image.required"),
        Attribute("processor_call_kwargs", "image.processor_kwargs"),
        Attribute("image_processor_backend", "image.processor_backend"),
        Attribute("train_padding_side", "padding_side.train"),
        Attribute("infer_padding_side", "padding_side.infer"),
        Attribute("inline_chat_template", "chat_template.template"),
        Attribute("answer_as_suffix", "chat_template.answer", lambda answer: answer == "suffix"),
        Attribute("text_messages_as_string", "chat_template.text_messages", lambda kind: kind == "string"),
        Attribute("stop_token", "chat_template.stop_token"),
        Attribute("takes_system", "chat_template.system"),
        Attribute("images_lead", "chat_template.images", lambda where: where == "leading"),
        Attribute("trl_training_template", "chat_template.training", lambda which: which == "trl"),
        Attribute("prefix_lm", "token_type_ids", lambda kind: kind == "prefix_lm"),
        Attribute("video", "video", _video),
    ),
}

_REQUIRED = object()


def spec_value(spec: BaseModel, path: str) -> Any:
    value: Any = spec
    for part in path.split("."):
        value = getattr(value, part)
    return value


def schema_default(path: str) -> Any:
    """The schema's default for a dotted field (``_REQUIRED`` where the field has none)."""
    model: Any = ModelSpec
    parts = path.split(".")
    for index, part in enumerate(parts):
        info = model.model_fields[part]
        if index == len(parts) - 1:
            if info.default is not PydanticUndefined:
                return info.default
            return info.default_factory() if info.default_factory is not None else _REQUIRED
        model = info.annotation
    return _REQUIRED


@dataclass
class GeneratedClass:
    slot: str
    name: str
    bases: list[str]
    body: list[tuple[str, Any]] = field(default_factory=list)  # (attribute, value) in order


def attributes(slot: str, spec: ModelSpec) -> list[tuple[str, Any]]:
    """``(attribute, value)`` for every field of ``slot`` whose spec value is not the schema's default."""
    out = []
    for attribute in ATTRIBUTES.get(slot, ()):
        value = attribute.convert(spec_value(spec, attribute.field))
        default = schema_default(attribute.field)
        if default is _REQUIRED or value != attribute.convert(default):
            out.append((attribute.name, value))
    return out


def adapter_classes(spec: ModelSpec, hooked_slots: set[str]) -> list[GeneratedClass]:
    """The adapter's classes in ``core_mapper`` order: name, bases (override mixin first) and attributes."""
    prefix = spec.class_prefix
    classes = []
    for slot in SLOTS:
        bases = [f"hooks.{slot.mixin}"] if slot.name in hooked_slots else []
        bases.append(f"api.{slot.base}")
        if slot.name == "reward_collator":  # the DPO batch layout, with the family's DPO collator hooks
            bases.append(f"{prefix}DPODataCollatorWithPadding")
        body = attributes(slot.name, spec)
        if slot.name in ("reward_model", "value_model"):
            body.append(("vl_model", Name(f"{prefix}ForRL")))
        classes.append(GeneratedClass(slot.name, prefix + slot.suffix, bases, body))
    return classes
