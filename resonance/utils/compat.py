"""Workarounds for the library versions we run on, each with the reason it exists."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers.processing_utils import ProcessorMixin, _get_modality_for_attribute
from transformers.utils import is_torchvision_available

__all__ = ["install_video_processor_optional", "video_processor_optional"]


def _without_video(original: Any) -> Any:
    def get_attributes(cls: type[ProcessorMixin]) -> list[str]:
        names = original.__func__(cls)
        return [name for name in names if _get_modality_for_attribute(name) != "video_processor"]

    get_attributes._resonance_without_video = True  # type: ignore[attr-defined]
    return classmethod(get_attributes)


def _video_patch_active() -> bool:
    return getattr(ProcessorMixin.__dict__["get_attributes"].__func__, "_resonance_without_video", False)


def install_video_processor_optional() -> bool:
    """Process-wide version of :func:`video_processor_optional` (idempotent). Returns whether it patched."""
    if is_torchvision_available() or _video_patch_active():
        return False
    ProcessorMixin.get_attributes = _without_video(ProcessorMixin.__dict__["get_attributes"])
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
    """
    original = ProcessorMixin.__dict__["get_attributes"]
    patched = install_video_processor_optional()
    try:
        yield
    finally:
        if patched:
            ProcessorMixin.get_attributes = original
