"""Workarounds for the library versions we run on, each with the reason it exists."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers.processing_utils import ProcessorMixin, _get_modality_for_attribute
from transformers.utils import is_torchvision_available

__all__ = [
    "VideoProcessorUnavailable",
    "install_video_processor_optional",
    "video_processor_kwargs",
    "video_processor_optional",
]


def _without_video(original: Any) -> Any:
    def get_attributes(cls: type[ProcessorMixin]) -> list[str]:
        names = original.__func__(cls)
        return [name for name in names if _get_modality_for_attribute(name) != "video_processor"]

    get_attributes._resonance_without_video = True  # type: ignore[attr-defined]
    return classmethod(get_attributes)


def _video_patch_active() -> bool:
    return getattr(ProcessorMixin.__dict__["get_attributes"].__func__, "_resonance_without_video", False)


@functools.cache
def _requires_video_processor(processor_class: type) -> bool:
    """Whether the processor class cannot be built without a video processor (SmolVLM's: no default)."""
    parameter = inspect.signature(processor_class.__init__).parameters.get("video_processor")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def video_processor_kwargs(processor_class: type) -> dict[str, Any]:
    """``{"video_processor": None}`` for a class that requires one while video processors are left out, else {}.

    The processor passes it on positionally, where the patched ``get_attributes`` drops it; the instance
    then reads a :class:`VideoProcessorUnavailable` (see :func:`video_processor_optional`).
    """
    if _video_patch_active() and _requires_video_processor(processor_class):
        return {"video_processor": None}
    return {}


class VideoProcessorUnavailable:
    """The ``video_processor`` of a processor that requires one, built without one (torchvision is missing).

    Such processors may read the video processor's settings outside any video work: SmolVLM's
    ``apply_chat_template`` passes its ``num_frames`` and ``fps`` on as sampling defaults on every call.
    Here every setting reads as None (unset: nothing is sampled without videos), the processor produces
    no model inputs, and processing a video raises ImportError. It lives on the class, not in the
    processor's ``__dict__``, so it is never saved.
    """

    model_input_names: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> None:
        if name.startswith("_"):
            raise AttributeError(f"{name}: there is no video processor (torchvision is not installed)")
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError("processing videos needs a video processor, and so torchvision, which is not installed")


class _MissingVideoProcessor:
    """``processor.video_processor`` where the instance has none: the stand-in if its class requires one.

    A non-data descriptor: a video processor set on the instance (with torchvision) always wins.
    """

    unavailable = VideoProcessorUnavailable()

    def __get__(self, instance: Any, owner: type | None = None) -> VideoProcessorUnavailable:
        if instance is not None and _requires_video_processor(type(instance)):
            return self.unavailable
        raise AttributeError("video_processor")


def _with_video_kwargs(original: Any) -> Any:
    def from_args_and_dict(cls: type[ProcessorMixin], args: Any, processor_dict: dict[str, Any], **kwargs: Any) -> Any:
        return original.__func__(cls, args, {**processor_dict, **video_processor_kwargs(cls)}, **kwargs)

    return classmethod(from_args_and_dict)


def install_video_processor_optional() -> bool:
    """Process-wide version of :func:`video_processor_optional` (idempotent). Returns whether it patched."""
    if is_torchvision_available() or _video_patch_active():
        return False
    ProcessorMixin.get_attributes = _without_video(ProcessorMixin.__dict__["get_attributes"])
    ProcessorMixin.from_args_and_dict = _with_video_kwargs(ProcessorMixin.__dict__["from_args_and_dict"])
    if "video_processor" not in ProcessorMixin.__dict__:  # stays: processors built here outlive the patch
        ProcessorMixin.video_processor = _MissingVideoProcessor()
    return True


@contextmanager
def video_processor_optional() -> Iterator[None]:
    """Let processors that declare a ``video_processor`` (Qwen2-VL...) work without one, without torchvision.

    transformers' video processors all need torchvision: without it a Qwen2-VL processor can be neither
    constructed, saved, nor loaded with ``AutoProcessor.from_pretrained``. While this context is active
    (and only when torchvision is missing), ``ProcessorMixin.get_attributes`` leaves video processors out,
    so such processors are built, saved and loaded with image processor and tokenizer only; the saved
    folder has no video processor entry, like older hub checkpoints (with torchvision, AutoProcessor
    infers the family's default video processor for it). With torchvision this does nothing.

    Processors that cannot be built without a video processor (a required ``video_processor`` argument,
    like SmolVLM's) get None for it while loading (``from_args_and_dict``; :func:`video_processor_kwargs`
    for direct construction), and afterwards read a :class:`VideoProcessorUnavailable` as their
    ``video_processor``; that class-level fallback stays installed, as such processors outlive the context.
    """
    original = ProcessorMixin.__dict__["get_attributes"]
    original_from_args = ProcessorMixin.__dict__["from_args_and_dict"]
    patched = install_video_processor_optional()
    try:
        yield
    finally:
        if patched:
            ProcessorMixin.get_attributes = original
            ProcessorMixin.from_args_and_dict = original_from_args
