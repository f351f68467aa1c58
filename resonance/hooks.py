"""The hooks a spec's ``overrides:`` may replace, with the parameters each must take.

This catalogue is read by the compiler, which must not import torch, so it is plain data; a test
checks it against the real base classes' signatures so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hook:
    slot: str  # the generated class: model, processor, sft_collator, ...
    method: str
    params: tuple[str, ...]  # parameter names, first one included (cls or self)
    classmethod: bool = False


HOOKS: dict[str, Hook] = {
    f"{hook.slot}.{hook.method}": hook
    for hook in (
        Hook("model", "get_vision_tower", ("cls", "model"), classmethod=True),
        Hook("model", "freeze_vision_tower", ("cls", "model"), classmethod=True),
        Hook("model", "prepare_default_generation_kwargs", ("cls", "generation_config"), classmethod=True),
        Hook("model", "lora_target_modules", ("cls", "names"), classmethod=True),
        Hook("processor", "format_multimodal_prompt", ("self", "prompt", "num_images")),
        Hook("processor", "remove_image_placeholder", ("self", "prompt")),
        Hook("processor", "is_multimodal_prompt_valid", ("self", "prompt")),
        Hook("processor", "render_conversation", ("self", "messages", "add_generation_prompt")),
        Hook("processor", "assistant_char_spans", ("self", "messages", "first_supervised")),
        Hook("sft_collator", "load_images", ("self", "paths", "source")),
        Hook("dpo_collator", "load_images", ("self", "paths", "source")),
    )
}

SLOTS = ("model", "processor", "sft_collator", "dpo_collator", "sft_trainer", "dpo_trainer")
