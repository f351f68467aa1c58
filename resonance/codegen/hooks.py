"""The classes of an adapter (the seed's ``core_mapper`` slots) and the hooks a spec's ``overrides:`` may replace.

An override module defines one mixin class per slot it changes (``ProcessorHooks``, ``ModelHooks``, ...) with
the hook methods the spec lists; the generated class puts that mixin first (generation gap), so a hook may call
``super()``. The compiler must not import torch, so this catalogue is plain data; a test checks it against the
real base classes' signatures so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """One class of a generated adapter: its ``core_mapper`` field, class-name suffix, base class and mixin."""

    name: str  # the core_mapper field: model, processor, sft_collator, ...
    suffix: str  # LlavaForRL, LlavaProcessor, LlavaSFTDataCollatorWithPadding, ...
    base: str  # the class in resonance.api it subclasses
    mixin: str  # the class an override module defines for it


SLOTS: tuple[Slot, ...] = (
    Slot("model", "ForRL", "VLModel", "ModelHooks"),
    Slot("processor", "Processor", "VLProcessor", "ProcessorHooks"),
    Slot("sft_collator", "SFTDataCollatorWithPadding", "VLSFTDataCollatorWithPadding", "SFTCollatorHooks"),
    Slot("sft_trainer", "SFTTrainer", "VLSFTTrainer", "SFTTrainerHooks"),
    Slot("dpo_collator", "DPODataCollatorWithPadding", "VLDPODataCollatorWithPadding", "DPOCollatorHooks"),
    Slot("dpo_trainer", "DPOTrainer", "VLDPOTrainer", "DPOTrainerHooks"),
    Slot("reward_model", "RewardModel", "VLRewardModel", "RewardModelHooks"),
    Slot("reward_collator", "RewardDataCollatorWithPadding", "VLRewardDataCollatorWithPadding", "RewardCollatorHooks"),
    Slot("reward_trainer", "RewardTrainer", "VLRewardTrainer", "RewardTrainerHooks"),
    Slot("value_model", "ValueModel", "VLModelWithValueHead", "ValueModelHooks"),
    Slot("ppo_collator", "PPODataCollator", "VLPromptCollator", "PPOCollatorHooks"),
    Slot("ppo_trainer", "PPOTrainer", "VLPPOTrainer", "PPOTrainerHooks"),
    Slot("grpo_trainer", "GRPOTrainer", "VLGRPOTrainer", "GRPOTrainerHooks"),
)
SLOT_BY_NAME = {slot.name: slot for slot in SLOTS}
SLOT_BY_MIXIN = {slot.mixin: slot for slot in SLOTS}


@dataclass(frozen=True)
class Hook:
    slot: str  # the generated class: model, processor, sft_collator, ...
    method: str
    params: tuple[str, ...]  # parameter names, first one included (cls or self); *args and **kwargs with stars
    classmethod: bool = False


_LOSS = ("self", "model", "inputs", "return_outputs", "num_items_in_batch")
_LOAD_IMAGES = ("self", "paths", "source")

HOOKS: dict[str, Hook] = {
    f"{hook.slot}.{hook.method}": hook
    for hook in (
        Hook("model", "get_vision_tower", ("cls", "model"), classmethod=True),
        Hook("model", "freeze_vision_tower", ("cls", "model"), classmethod=True),
        Hook("model", "prepare_default_generation_kwargs", ("cls", "generation_config"), classmethod=True),
        Hook("model", "lora_target_modules", ("cls", "names"), classmethod=True),
        Hook("model", "encode_images", ("cls", "model", "image_inputs"), classmethod=True),
        Hook("processor", "format_multimodal_prompt", ("self", "prompt", "num_images")),
        Hook("processor", "remove_image_placeholder", ("self", "prompt")),
        Hook("processor", "is_multimodal_prompt_valid", ("self", "prompt")),
        Hook("processor", "render_conversation", ("self", "messages", "add_generation_prompt")),
        Hook("processor", "assistant_char_spans", ("self", "messages", "first_supervised")),
        Hook("sft_collator", "load_images", _LOAD_IMAGES),
        Hook("dpo_collator", "load_images", _LOAD_IMAGES),
        Hook("reward_collator", "load_images", _LOAD_IMAGES),
        Hook("ppo_collator", "load_images", _LOAD_IMAGES),
        Hook("sft_trainer", "compute_loss", _LOSS),
        Hook("dpo_trainer", "pair_layout", ("self", "model", "inputs")),
        Hook("reward_trainer", "rewards", ("self", "model", "inputs")),
        Hook("reward_model", "forward", ("self", "input_ids", "attention_mask", "**inputs")),
        Hook("value_model", "lm_logits", ("self", "hidden")),
        Hook("ppo_trainer", "generate_and_score", ("self", "rows")),
        Hook("ppo_trainer", "compute_advantages", ("self", "rollouts")),
        Hook("grpo_trainer", "compute_loss", _LOSS),
    )
}
