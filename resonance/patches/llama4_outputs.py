"""transformers 5.24: ``Llama4ForConditionalGeneration.forward`` raises on every call.

It builds its output with ``image_outputs=outputs.image_outputs`` (models/llama4/modeling_llama4.py, the last lines
of the forward), where ``outputs`` is its language model's ``MoeCausalLMOutputWithPast``, which has no such field:
no forward, generate or training step of a Llama 4 checkpoint runs. Here the language model's output gets
``image_outputs = None`` as an attribute (not a field: its type, keys and ``to_tuple()`` are unchanged), which is
what the conditional-generation output then carries. A no-op where the output has the attribute (a transformers
that fixed it) and when installed twice.
"""

from __future__ import annotations

import functools
from typing import Any


def install() -> None:
    from transformers.models.llama4 import modeling_llama4

    language_model = modeling_llama4.Llama4ForCausalLM
    forward = language_model.forward
    if getattr(forward, "_resonance_image_outputs", False):
        return

    @functools.wraps(forward)
    def with_image_outputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, *args, **kwargs)
        if not isinstance(out, tuple) and not hasattr(out, "image_outputs"):
            object.__setattr__(out, "image_outputs", None)
        return out

    with_image_outputs._resonance_image_outputs = True  # type: ignore[attr-defined]
    language_model.forward = with_image_outputs
