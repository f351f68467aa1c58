"""GRPO for vision-language models: TRL 1.x's GRPOTrainer with our data rows, chat templates and reward checks.

TRL's trainer does the rollouts (left-padded prompts through the family's HF processor, ``model.generate``),
the group-relative advantages, the clipped policy loss and the optional KL to the reference (the adapter
disabled under LoRA). Under FSDP 2 and DeepSpeed ZeRO-3 the libraries also synchronize the rollouts, so a process
whose completions end first keeps joining the others' weight gathers: transformers' Trainer registers ``generate``
as a forward method of the FSDP root, TRL gathers the ZeRO-3 weights around it (``ds3_gather_for_generation``), and
``generate`` turns ``synced_gpus`` on by itself under both (torch's ``fully_shard`` marks the modules it manages,
``is_fsdp_managed_module``; ``is_deepspeed_zero3_enabled``). tests/algorithms/test_sharded_rollouts*.py hold them
to it with completions that end at different lengths per process. Resonance adds:

* prompt rows (``resonance.data.rows`` kind ``"prompt"``) turned into TRL's conversational prompts, images opened
  lazily per batch with the row's ``FILE:LINE`` in any error;
* reward functions named on the command line (``--reward_funcs pkg.module:function``, :mod:`resonance.reward_funcs`),
  each call checked, so a bad value is an error naming the row, never a silent zero in TRL's ``nansum``, and a
  function that hangs (``--reward_timeout``) or calls ``sys.exit`` fails the run instead of stalling or ending it;
* a process whose prompts hold no image, among several that gather the vision tower's weights from each other, runs
  it on a placeholder image wherever the others run it on theirs (:class:`~resonance.algorithms.image_features.
  ImageEncodingMixin`): in ``generate`` and in every forward pass that takes log-probs;
* TRL 1.16's gather of the prompts' images for its completion logs (``log_multimodal``), which only processes whose
  prompts hold images join, turned off for a step where some process has none (the others would wait in it);
* the inputs TRL's trainer does not pass to its log-prob passes (Mllama's cross-attention mask and aspect ratios,
  InstructBLIP's Q-Former prompt) carried with each row to every pass (:meth:`VLGRPOTrainer._carried_tensors`);
* a group's prompt prefilled once for its completions (:mod:`resonance.patches.shared_prefill`);
* a step's images encoded once where no weight that encodes them trains: before generation, which takes the
  features (:meth:`VLGRPOTrainer._rollout_generate`), and the step's old-policy, reference and loss passes
  take them too (each row's group goes with it through TRL's shuffle and split);
* a group's completions run as one row over one copy of their prompt in the log-prob and loss passes
  (``--shared_prompt``, :mod:`resonance.algorithms.shared_prompt`): each row's group goes with it through TRL's
  shuffle and split, and each forward pass plans its rows' layout;
* the families TRL's trainer cannot drive are refused up front (:func:`unsupported_reason`), and PaliGemma's
  prefix-LM ``token_type_ids`` are set right for the completion (TRL extends them with zeros, which would make
  completion tokens attend to later completion tokens).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationMixin
from trl import GRPOConfig, GRPOTrainer

from resonance.algorithms import ALGORITHMS
from resonance.algorithms.arguments import DataArguments, ModelArguments
from resonance.algorithms.guards import WholeCheckpoints
from resonance.algorithms.image_features import GroupFeatures, ImageEncodingMixin, weights_sharded
from resonance.algorithms.setup import apply_lora, load_data_and_model
from resonance.algorithms.shared_prompt import install_shared_prompt, may_share, plan_groups, sharing
from resonance.base.model import VLModel, no_hub_kernels, unwrap
from resonance.base.processor import VLProcessor
from resonance.base.registry import ModelCoreMapper
from resonance.data.images import load_row_images
from resonance.errors import RewardFunctionError, UnsupportedModelError
from resonance.generation import (
    adapters_merged,
    check_cache_implementation,
    check_rollout_adapters,
    decode_settings,
    rollout_adapters_field,
)
from resonance.patches import deferred_stop, input_grad_hooks, packed_gqa, paligemma_labels
from resonance.patches.compile_layers import blocks_eager
from resonance.patches.fused_head import fused_head_backbone
from resonance.patches.shared_prefill import encoder_outputs_copy, prefill_once
from resonance.reward_funcs import (
    DEFAULT_REWARD_TIMEOUT,
    check_reward_timeout,
    checked_reward,
    conversational_message,
    ensure_checked,
    load_reward_funcs,
    reward_funcs_field,
    reward_timeout_field,
)

__all__ = ["RewardFunctionError", "VLGRPOConfig", "VLGRPOTrainer", "checked_reward", "load_reward_funcs"]

logger = logging.getLogger("resonance")

# Image inputs TRL 1.16's GRPOTrainer hands to the model in its loss forward (it drops others silently), and
# batch_num_images, which may be left out for rows of one image (see max_images_for_grpo).
# What TRL 1.16's GRPOTrainer passes to forward (grpo_trainer.py _get_per_token_logps_and_entropies; Gemma 4's
# image_position_ids, per image like its pixel_values)
TRL_IMAGE_INPUTS = {
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "image_sizes",
    "batch_num_images",
    "image_position_ids",
}


# The batch's rows' prompt groups (one id per group in a batch), shuffled and split with the rows by TRL
GROUP_KEY = "resonance_prompt_group"


@dataclass
class VLGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig plus the reward functions, named on the command line, and their time limit."""

    reward_funcs: str | None = reward_funcs_field()
    reward_timeout: float = reward_timeout_field()
    cache_implementation: str | None = field(
        default="auto",
        metadata={
            "help": "The completions' KV cache: auto (static on a GPU where the model compiles whole, else "
            "dynamic), static (transformers' compiled decode step on a GPU), dynamic, or another transformers "
            "cache_implementation."
        },
    )
    rollout_adapters: str = rollout_adapters_field()
    shared_prompt: bool = field(
        default=True,
        metadata={
            "help": "Run each group's completions in one row over a single copy of their prompt (and its image "
            "tokens) in the log-prob and loss passes, with an attention mask that keeps them apart: the same "
            "log-probs as a row each, for fewer tokens. Needs sdpa or eager attention; families whose attention is "
            "not plain causal (spec shared_prompt: false) always run a row per completion."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_reward_timeout(self.reward_timeout)
        check_cache_implementation(self.cache_implementation)
        check_rollout_adapters(self.rollout_adapters)


# ----------------------------------------------------------------------------------------------- family


def unsupported_reason(vl_model: type[VLModel], vl_processor: type[VLProcessor] | VLProcessor) -> str | None:
    """Why TRL's GRPOTrainer cannot train this family correctly, or None when it can."""
    # inputs of one row each (Mllama's aspect ratios, InstructBLIP's Q-Former prompt) are carried past TRL's
    # trainer with the rows (VLGRPOTrainer._carried_inputs_each_forward); others it drops would need splitting
    carried = {item.name for item in vl_processor.image_inputs if item.layout == "per_row"}
    missing = sorted({item.name for item in vl_processor.image_inputs} - TRL_IMAGE_INPUTS - carried)
    if missing:
        return f"{vl_model.hf_model_class} needs {', '.join(missing)}, which TRL's GRPOTrainer does not pass to forward"
    tiled = sorted(item.name for item in vl_processor.image_inputs if item.layout == "per_tile")
    if tiled and isinstance(vl_processor, VLProcessor) and not _counts_tiles(vl_processor.image_processor):
        return (
            f"{vl_model.hf_model_class} takes {', '.join(tiled)} as a varying number of tiles per image (spec layout "
            f"per_tile), which TRL's GRPOTrainer splits between prompts only by an image processor's num_patches "
            f"(InternVL's); {type(vl_processor.image_processor).__name__} returns none"
        )
    return None


def _counts_tiles(image_processor: Any) -> bool:
    """Whether the image processor returns num_patches when TRL asks it to count tiles (crop_to_patches=True)."""
    from PIL import Image

    try:
        counted = image_processor(images=[Image.new("RGB", (64, 48))], crop_to_patches=True, return_tensors="pt")
    except (TypeError, ValueError):  # one that takes no crop_to_patches (Llama 4's) counts no tiles either
        return False
    return "num_patches" in counted


def _group_size(rows: list[dict[str, Any]], size: int) -> int:
    """``size`` where ``rows`` are groups of ``size`` copies of one row each (the prompt, its images and source), in a
    row, as TRL's sampler repeats a prompt for its ``num_generations`` completions; else 1."""
    if size <= 1 or len(rows) % size:
        return 1
    keys = [(row.get("source"), repr(row.get("prompt")), repr(row.get("images"))) for row in rows]
    return size if all(keys[i] == keys[i - i % size] for i in range(len(keys))) else 1


def max_images_for_grpo(vl_processor: type[VLProcessor]) -> int | None:
    """How GRPO narrows the family's image count (:class:`~resonance.data.images.ImageCount`), or None.

    TRL's loss forward never passes ``batch_num_images``; LLaVA-OneVision then treats every image as a row's only
    image (anyres patching), which is right only for rows with one image.
    """
    return 1 if any(item.name == "batch_num_images" for item in vl_processor.image_inputs) else None


class VLGRPOTrainer(WholeCheckpoints, ImageEncodingMixin, GRPOTrainer):
    """TRL's GRPOTrainer on Resonance prompt rows (see the module docstring)."""

    def __init__(self, *args: Any, vl_model: type[VLModel], vl_processor: VLProcessor, **kwargs: Any):
        reason = unsupported_reason(vl_model, vl_processor)
        if reason is not None:
            raise UnsupportedModelError(f"GRPO: {reason}")
        self.vl_model = vl_model
        self.vl_processor = vl_processor
        # TRL switches gradient checkpointing off and on around each generation: one embedding hook more each time,
        # and a recompiled decode step each time, without this patch (a model not loaded through Resonance too)
        input_grad_hooks.install()
        paligemma_labels.install()  # TRL tokenizes the prompts unpadded: it failed on PaliGemma's labels of two lengths
        deferred_stop.install()  # on CUDA the host queues the next token's step before this one's stop check is read
        packed_gqa.install()  # the compiled decode step reads grouped key/value heads without copying them
        # TRL pads prompts on the left; its processor call for the image inputs (and Gemma 3's token_type_ids,
        # which must line up with the left-padded prompt ids) follows the tokenizer's padding side.
        vl_processor.infer()
        kwargs.setdefault("processing_class", vl_processor.hf)
        # A completion holding an image placeholder token cannot be scored (more image tokens than features).
        config = kwargs.get("args")
        # Reward functions passed as Python functions (not through --reward_funcs) get the same checks.
        funcs = kwargs.get("reward_funcs")
        if funcs is not None:
            timeout = getattr(config, "reward_timeout", DEFAULT_REWARD_TIMEOUT)
            kwargs["reward_funcs"] = ensure_checked(funcs if isinstance(funcs, list) else [funcs], timeout)
        if config is not None:
            suppress = sorted(
                {*(config.generation_kwargs or {}).get("suppress_tokens", []), *vl_processor.placeholder_token_ids()}
            )
            config.generation_kwargs = {**(config.generation_kwargs or {}), "suppress_tokens": suppress}
        # TRL hands cache_implementation to transformers' GenerationConfig as it is, which knows no "auto": decided
        # per call instead (_generate_single_turn), once the model is on its device.
        self.cache_implementation = getattr(config, "cache_implementation", None)
        if config is not None:
            config.cache_implementation = None
        self._copies = self._generating_copies = 1  # prompt copies per group in this batch (_group_size)
        self._carried: dict[str, torch.Tensor] = {}  # _carried_tensors of the batch at hand
        self._groups = torch.zeros(0, dtype=torch.long)  # the batch's rows' prompt groups (_tokenize_prompts)
        self._next_group = 0  # group ids run on across batches: a pass never takes another batch's features
        self._rollout_features: GroupFeatures | None = None  # the last batch's images as generation encoded them
        self._encoding_for_rollout = False  # the next _generate_single_turn is a batch's first
        self._trl_inputs = set(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
        try:
            super().__init__(*args, **kwargs)
        finally:
            if config is not None:
                config.cache_implementation = self.cache_implementation
        if self.ref_model is not None:  # full training with beta > 0: TRL loaded the reference from the checkpoint
            no_hub_kernels(unwrap(self.ref_model))
        fused_head_backbone(unwrap(self.model))  # TRL's fused LM head on InstructBLIP, as SFT and DPO
        fused_head_backbone(None if self.ref_model is None else unwrap(self.ref_model))
        install_shared_prompt(self.model, vl_model.position_ids_kind)
        install_shared_prompt(self.ref_model, vl_model.position_ids_kind)
        vl_model.batch_vision_attention(self.model, self.ref_model)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._copies = _group_size(inputs, self.num_generations if self.model.training else self.num_generations_eval)
        rows = []
        for index, row in enumerate(inputs):
            if index % self._copies:  # a copy of the group's first row: the same prompt and images
                rows.append(rows[-1])
                continue
            source = row.get("source") or "<row>"
            images = load_row_images(self.vl_processor, list(row.get("images") or []), source)
            rows.append({**row, "prompt": [conversational_message(m) for m in row["prompt"]], "images": images})
        if self.accelerator.num_processes > 1 and self.args.log_multimodal:
            # TRL 1.16 gathers the prompts' images for its completion logs (log_multimodal) only on the processes
            # whose prompts hold some: a process without any would leave the others waiting in that gather. Logged
            # only when every process has images.
            has_images = torch.tensor([any(row["images"] for row in rows)], device=self.accelerator.device)
            self.log_multimodal = bool(self.accelerator.gather(has_images).all())
        output = super()._generate_and_score_completions(rows)
        # TRL shuffles and splits them with the rows for its loss passes
        return {**output, **self._carried, GROUP_KEY: self._groups}

    def _tokenize_prompts(self, prompts: list) -> tuple[Any, Any, Any]:
        # A group's prompt (num_generations copies in a row, as TRL's sampler lays them out) is processed once, and
        # its images with it: the generation inputs hold each group once (_generate_single_turn samples the copies).
        copies = self._copies if len(prompts) % self._copies == 0 else 1
        self._generating_copies = copies
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts[::copies])
        carried = self._carried_tensors(multimodal_fields, prompt_ids)
        multimodal_fields = {**multimodal_fields, **carried}  # generation takes them as they are
        self._carried = {name: value.repeat_interleave(copies, dim=0) for name, value in carried.items()}
        groups = len(prompts) // copies
        self._groups = torch.arange(self._next_group, self._next_group + groups).repeat_interleave(copies)
        self._next_group += groups
        self._rollout_features, self._encoding_for_rollout = None, True
        # TRL 1.16 marks a prompt without images None among prompts with some, and later passes that list to the
        # processor for the scoring inputs, which refuses None: such a prompt gets no images ([]) instead.
        if images is not None:
            images = [row_images or [] for row_images in images for _ in range(copies)]
        return [ids for ids in prompt_ids for _ in range(copies)], images, multimodal_fields

    def _carried_tensors(self, fields: dict[str, Any], prompt_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """The processor outputs TRL's trainer does not pass to its log-prob forward passes, as tensors of one row per
        prompt: inputs of one row each (spec layout per_row: Mllama's aspect ratios, InstructBLIP's Q-Former prompt,
        padded on the right) and the text's own per-token inputs (Mllama's cross_attention_mask), left-padded like
        TRL's prompt ids (the processor, called without padding, aligns them with each prompt from its start)."""
        from trl.trainer.utils import pad

        names = {item.name: item for item in self.vl_processor.image_inputs}
        width = max(len(ids) for ids in prompt_ids)
        carried = {}
        for name, value in fields.items():
            per_row = name in names and names[name].layout == "per_row"
            if name in self._trl_inputs or name in ("labels", "batch_num_images") or not (per_row or name not in names):
                continue  # TRL's own, dropped on purpose (the forward_kwargs comment below), or split by TRL
            rows = [torch.as_tensor(row) for row in value]
            if per_row:
                carried[name] = pad(rows, padding_value=0, padding_side="right")
                continue
            if any(row.shape[0] not in (len(ids), width) for row, ids in zip(rows, prompt_ids, strict=True)):
                raise ValueError(f"GRPO: {name} has a length that matches neither the prompt's tokens nor the longest")
            rows = [row[: len(ids)] for row, ids in zip(rows, prompt_ids, strict=True)]
            carried[name] = pad(rows, padding_value=0, padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of)
        return carried

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        self._carried = {name: inputs[name] for name in self._carried if name in inputs}  # this batch's rows
        self._groups = inputs.get(GROUP_KEY, torch.zeros(0, dtype=torch.long))
        return super()._compute_loss(model, inputs)

    @contextlib.contextmanager
    def _shared_prompts_each_forward(
        self, model: torch.nn.Module, completion: int, units: list[list[int] | None]
    ) -> Iterator[None]:
        """Each forward pass of ``model`` (TRL takes log-probs in chunks of rows, a forward pass each, in order) runs
        its rows of one prompt group as one row over that prompt (:func:`~resonance.algorithms.shared_prompt.
        plan_groups`), where the batch allows it. ``units``: TRL's counts per row of images and tiles."""
        if not may_share(self.args, self.vl_model, model, self.aux_loss_enabled) or len(self._groups) == 0:
            yield
            return
        start = [0]
        placeholders = self.vl_processor.placeholder_token_ids()

        def shared(inputs: dict[str, Any]) -> sharing:
            ids = inputs["input_ids"]
            rows = slice(start[0], start[0] + ids.shape[0])
            start[0] += ids.shape[0]
            layout = plan_groups(
                ids,
                inputs["attention_mask"],
                completion,
                self._groups[rows],
                placeholders,
                [counts[rows] for counts in units if counts is not None],
                multiple_of=self.pad_to_multiple_of or 1,
            )
            return sharing(layout, model)

        with _each_forward(model, shared):
            yield

    @contextlib.contextmanager
    def _carried_inputs_each_forward(self, model: torch.nn.Module, completion: int) -> Iterator[None]:
        """Each forward pass of ``model`` gets its rows of the carried inputs (:meth:`_carried_tensors`; TRL takes
        log-probs in chunks of rows, a forward pass each, in order), the per-token ones extended over ``completion``
        tokens as ``generate`` extends them (Mllama's cross-attention mask repeats the prompt's last position)."""
        if not self._carried:
            yield
            return
        names = set(self.vl_processor.image_input_names())
        carried = {}
        for name, value in self._carried.items():
            if name not in names:
                value = torch.cat([value, value[:, -1:].expand(-1, completion, *value.shape[2:])], dim=1)
            carried[name] = value
        start = [0]

        def add(module: torch.nn.Module, args: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            rows = inputs["input_ids"].shape[0]
            device = inputs["input_ids"].device
            part = {name: value[start[0] : start[0] + rows].to(device) for name, value in carried.items()}
            start[0] += rows
            return args, {**inputs, **part}

        handle = model.register_forward_pre_hook(add, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        copies, self._generating_copies = self._generating_copies, 1  # the first turn's; tool turns are per row
        first_turn, self._encoding_for_rollout = self._encoding_for_rollout, False
        self._decode_settings(max(len(ids) for ids in prompt_ids))
        if copies > 1:
            # the group's prompt is processed, prefilled and its images encoded once (_rollout_generate), then
            # generate samples num_return_sequences completions of it, in the rows' order (each group's together)
            prompt_ids, images = prompt_ids[::copies], (images[::copies] if images is not None else None)
        self.generation_config.num_return_sequences = copies
        self.generation_kwargs["num_return_sequences"] = copies
        adapters = getattr(self.args, "rollout_adapters", "auto")
        try:
            # prompts without images: the placeholder pass where generate encodes the others' images
            with (
                adapters_merged(self.accelerator.unwrap_model(self.model), adapters),
                self._idle_encoder(self.model_wrapped, multimodal_fields, generation=True),
                blocks_eager(self.model),  # training's compiled blocks (--compile_layers)
                self._rollout_generate(images if first_turn else None, copies),
            ):
                return super()._generate_single_turn(
                    prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
                )
        finally:
            self.generation_config.num_return_sequences = 1
            self.generation_kwargs.pop("num_return_sequences", None)

    @contextlib.contextmanager
    def _rollout_generate(self, images: list[list[Any]] | None, copies: int) -> Iterator[None]:
        """Around the generation of a batch's first turn (``images``: each group's, one prompt per group, None for
        later turns; ``copies``: completions per prompt), transformers' ``generate`` is wrapped so that:

        * each prompt is prefilled once, not once per completion (:func:`~resonance.patches.shared_prefill.
          prefill_once`);
        * the images are encoded before ``generate``, which takes the features in place of the pixels (as PPO's
          rollouts do), and the features are kept for the step's later passes over the batch's rows (old policy,
          reference, loss: :meth:`_images_encoded_once_each_forward`), so that each image goes through the vision
          tower once a step. Where no weight that encodes images trains and the family's forward takes the
          features; not with sharded weights (they gather in the forward's order).

        Not for a family with its own ``generate``, nor with vLLM or continuous batching."""
        model = self.accelerator.unwrap_model(self.model)
        base = unwrap(model)
        if (
            self.use_vllm
            or self.use_transformers_continuous_batching
            or type(base).generate is not GenerationMixin.generate
            or (not images and copies < 2)
        ):
            yield
            return
        groups = self._groups.unique_consecutive().tolist()  # the generated prompts': one per group, in order
        encode = (
            bool(images)
            and len(groups) == len(images)
            and self.vl_model.image_features_input is None
            and self._encoder_frozen_and_reused(base)
            and not weights_sharded(self.accelerator)
        )
        first: dict[int, int] = {}  # each group's first image among the batch's, and its number of images
        count: dict[int, int] = {}
        if encode:
            counts = [len(group_images or []) for group_images in images]
            first = dict(zip(groups, [sum(counts[:i]) for i in range(len(counts))], strict=True))
            count = dict(zip(groups, counts, strict=True))
        generate = base.generate

        def rollout_generate(*args: Any, **inputs: Any) -> Any:
            features = None
            if encode:
                encoded = self._image_model_inputs(model, inputs, copies=1)
                if "mm_encoder_outputs" in encoded:
                    features = encoded["mm_encoder_outputs"]["image"]
                    self._rollout_features = GroupFeatures(base, features, first, count)
                    inputs = {k: v for k, v in encoded.items() if v is not None}  # generate: present means a value
            with prefill_once(base, copies):
                if features is not None:  # kept for the passes: generate gets a copy it may repeat in place
                    inputs = {**inputs, "mm_encoder_outputs": encoder_outputs_copy({"image": features})}
                return generate(*args, **inputs)

        base.generate = rollout_generate  # the call TRL makes, through PEFT's wrapper
        try:
            yield
        finally:
            del base.generate

    def _decode_settings(self, prompt_length: int) -> None:
        """The KV cache for this call's prompts (:func:`~resonance.generation.decode_settings`) in TRL's generation
        config and in the generation kwargs it lays over the model's (TRL turns transformers' compiled decode step
        off; a static cache turns it back on, as it does for PPO and ``resonance generate``)."""
        if self.use_vllm or self.use_transformers_continuous_batching:
            return
        multiple = self.pad_to_multiple_of or 1
        prompt_length = -(-prompt_length // multiple) * multiple
        chosen = {**self.generation_kwargs, "cache_implementation": self.cache_implementation}
        model = self.accelerator.unwrap_model(self.model)
        settings = decode_settings(model, prompt_length, chosen)
        static = {key: settings.get(key) for key in ("cache_implementation", "max_cache_len")}
        self.generation_kwargs.pop("max_cache_len", None)
        self.generation_kwargs.update({key: value for key, value in static.items() if value is not None})
        if static["cache_implementation"] is None:
            self.generation_kwargs.pop("cache_implementation", None)
        for key, value in static.items():
            setattr(self.generation_config, key, value)
        self.generation_config.disable_compile = static["cache_implementation"] is None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        # TRL passes every processor output of the prompts here for the old/reference log-probs (and only the ones
        # it knows to the loss forward). Dropped: the processor's own labels (PaliGemma returns some; TRL builds its
        # own) and LLaVA-OneVision's batch_num_images, which without it means "one image per row": what
        # max_images_for_grpo allows.
        kwargs.pop("labels", None)
        kwargs.pop("batch_num_images", None)
        for name in self._carried:
            kwargs.pop(name, None)  # the processor's own (padded its way): the carried tensors go in instead
        token_type_ids = kwargs.get("token_type_ids")
        if self.vl_processor.prefix_lm and token_type_ids is not None:
            # Prefix-LM (PaliGemma): 0 = the bidirectional prefix, 1 = causal. TRL extends the prompt's ids with 0
            # for the completion, which would let each completion token see the ones after it.
            token_type_ids = token_type_ids.clone()
            token_type_ids[:, -logits_to_keep:] = 1
            kwargs["token_type_ids"] = token_type_ids
        terms: list[torch.Tensor] = []
        with (
            self._carried_inputs_each_forward(model, logits_to_keep),
            self._idle_encoder_each_forward(model, terms),
            self._images_encoded_once_each_forward(model, kwargs.get("num_images")),
            self._shared_prompts_each_forward(
                model, logits_to_keep, [kwargs.get("num_images"), kwargs.get("num_tiles")]
            ),
        ):
            logps, *rest = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        # the placeholder passes in the loss (zero: the values unchanged; the backward pass runs through them)
        return (logps + sum(terms) if terms else logps, *rest)

    @contextlib.contextmanager
    def _images_encoded_once_each_forward(self, model: torch.nn.Module, images: Any) -> Iterator[None]:
        """Each forward pass of ``model`` takes its images' features, encoded under ``no_grad``, where no weight that
        encodes images trains (:meth:`~resonance.algorithms.image_features.ImageEncodingMixin._image_model_inputs`,
        as SFT, DPO and PPO do). TRL passes the pixels, and the forward would run the frozen tower in the autograd
        graph: the inputs that gradient checkpointing makes require gradients include the tower's patch embeddings
        (transformers' ``enable_input_require_grads`` hooks every input embedding), so the tower ran forward again
        and backward in every loss pass (an H200 profile of a GRPO step: 7,268 attention backward calls, 36 of them
        the language model's). The rows take their groups' features as generation encoded them
        (:meth:`_rollout_generate`), else a prompt group's images are encoded once for its rows (``images``:
        TRL's count per row of the batch, None without images; :meth:`_image_model_inputs_by_group`)."""
        start = [0]

        def encode(module: torch.nn.Module, args: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            rows = slice(start[0], start[0] + inputs["input_ids"].shape[0])
            start[0] = rows.stop
            groups = self._groups[rows].tolist()
            if images is None or len(groups) != rows.stop - rows.start:
                return args, self._image_model_inputs(model, inputs, copies=1)
            counts = [int(n) for n in images[rows]]
            if self._rollout_features is not None:
                encoded = self._rollout_features.inputs_of_rows(unwrap(model), inputs, groups, counts)
                if encoded is not None:
                    return args, encoded
            return args, self._image_model_inputs_by_group(model, inputs, groups, counts)

        handle = model.register_forward_pre_hook(encode, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _idle_encoder_each_forward(self, model: torch.nn.Module, terms: list[torch.Tensor]) -> Iterator[None]:
        """:meth:`_idle_encoder` around each forward pass of ``model`` whose inputs hold no image (TRL takes log-probs
        in chunks of rows, a forward pass each, each with its own rows' images); ``terms`` gets the terms to add to
        what the passes compute."""

        def keep_term(idle: Any) -> None:
            if idle.term is not None:
                terms.append(idle.term)

        with _each_forward(model, lambda inputs: self._idle_encoder(model, inputs), keep_term):
            yield


@contextlib.contextmanager
def _each_forward(
    model: torch.nn.Module,
    context_for: Callable[[dict[str, Any]], contextlib.AbstractContextManager],
    on_leave: Callable[[Any], None] | None = None,
) -> Iterator[None]:
    """``context_for(inputs)`` entered before each forward pass of ``model`` and left after it (``on_leave`` gets what
    entering it gave), and left too where a forward pass raised."""
    entered: list[tuple[contextlib.AbstractContextManager, Any]] = []

    def enter(module: torch.nn.Module, args: Any, inputs: dict[str, Any]) -> None:
        context = context_for(inputs)
        entered.append((context, context.__enter__()))

    def leave(module: torch.nn.Module, args: Any, inputs: dict[str, Any], output: Any) -> None:
        context, value = entered.pop()
        context.__exit__(None, None, None)
        if on_leave is not None:
            on_leave(value)

    handles = [
        model.register_forward_pre_hook(enter, with_kwargs=True),
        model.register_forward_hook(leave, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while entered:  # a forward pass that raised
            entered.pop()[0].__exit__(None, None, None)


def build(
    mapper: ModelCoreMapper, model_args: ModelArguments, data_args: DataArguments, config: VLGRPOConfig
) -> tuple[Any, VLProcessor]:
    """``resonance train grpo``: prompt rows, reward functions from --reward_funcs, the family's GRPO trainer; with
    --beta > 0 the reference is the adapter disabled."""
    reason = unsupported_reason(mapper.model, mapper.processor)
    if reason is not None:  # before data and model load
        raise UnsupportedModelError(f"GRPO: {reason}")
    reward_funcs = load_reward_funcs(config.reward_funcs, config.reward_timeout)
    train_rows, eval_rows, _, model, processor = load_data_and_model(
        mapper, model_args, data_args, config, ALGORITHMS["grpo"].data, max_images_for_grpo(mapper.processor)
    )
    trainer = mapper.grpo_trainer(
        model=apply_lora(model, mapper.model, model_args),
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=processor.hf,
        vl_model=mapper.model,
        vl_processor=processor,
    )
    return trainer, processor
