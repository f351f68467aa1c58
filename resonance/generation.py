"""Batched generation from prompt rows: what ``resonance generate``, PPO and GRPO rollouts and evaluation share.

:func:`generate_batch` takes canonical prompt rows (``resonance.data``, kind ``"prompt"``) and returns the answers'
texts and token ids. The processor runs in inference mode (left padding), so every row of a batch continues at the
same position and a batch generates what each row would alone.

The decoding itself is behind one small interface, :class:`RolloutEngine`; :class:`TransformersEngine` is the one
there is: transformers' ``generate``, with its static KV cache and compiled decode step on a GPU
(``cache_implementation``, see :func:`decode_settings`). An engine such as vLLM or SGLang would be another
implementation of the same method, taking the processor's batch and returning a :class:`Generation`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from resonance.base.collator import VLPromptCollator
from resonance.base.registry import load_core_mapper, processor_checkpoint
from resonance.errors import ConfigError, RowError
from resonance.patches import deferred_stop, packed_gqa
from resonance.patches.compile_layers import blocks_eager

logger = logging.getLogger("resonance")


@dataclass
class Generation:
    """What :func:`generate_batch` returns, one entry per row in the order given (``prompts``), and per answer
    (the others): ``num_return_sequences`` answers per row, each row's together.

    ``token_ids`` are the answer's tokens: the new tokens through the first end-of-sequence token, without
    the padding ``generate`` adds after it. ``texts`` are those tokens decoded with special tokens skipped,
    stripped of surrounding white space. ``sequences`` is ``generate``'s output (the left-padded prompts,
    then the new tokens) and ``inputs`` what ``generate`` was given, on the model's device: the processor's batch, or
    with the images' features in place of the pixels (PPO encodes them before generating).
    """

    prompts: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    sequences: torch.Tensor
    inputs: Any


def _eos_ids(generation_kwargs: dict[str, Any], model: Any) -> set[int]:
    eos = generation_kwargs.get("eos_token_id", getattr(model.generation_config, "eos_token_id", None))
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(token) for token in eos}


def to_model_device(inputs: Any, model: Any) -> Any:
    """The batch on the model's device, floating tensors (pixel values) in the model's dtype."""
    parameter = next(model.parameters())
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            dtype = parameter.dtype if value.is_floating_point() else value.dtype
            inputs[key] = value.to(device=parameter.device, dtype=dtype)
    return inputs


def generate_batch(
    model: Any,
    vl_processor: Any,
    vl_model: Any,
    rows: Sequence[dict[str, Any]],
    generation_kwargs: dict[str, Any],
) -> Generation:
    """Generate an answer for each canonical prompt row (``{"prompt": [Message], "images": [path], ...}``).

    ``model`` is the loaded model (a PEFT model too), ``vl_processor`` the family's processor instance,
    ``vl_model`` the family's model adapter class (unused today; the PPO trainer's signature), and
    ``generation_kwargs`` go to ``model.generate`` as they are (see :func:`generation_kwargs`). The prompts go
    through :class:`~resonance.base.collator.VLPromptCollator` (inference mode, left padding), then
    :func:`generate_from`.
    """
    del vl_model  # every family generates through model.generate; kept for a uniform adapter signature

    if not rows:
        raise ValueError("generate_batch: no rows")
    return generate_from(model, vl_processor, VLPromptCollator(vl_processor)(list(rows)), generation_kwargs)


def generate_from(
    model: Any, vl_processor: Any, batch: dict[str, Any], generation_kwargs: dict[str, Any]
) -> Generation:
    """Generate from a prompt batch of :class:`~resonance.base.collator.VLPromptCollator` (its ``inputs`` are moved
    to the model's device and dtype in place). The model runs in eval mode and under ``no_grad`` for the call.
    ``generation_kwargs["cache_implementation"]`` may also be ``"auto"`` (the default): see :func:`decode_settings`."""
    deferred_stop.install()  # on CUDA the host queues the next token's step before this one's stop check is read
    packed_gqa.install()  # the compiled decode step reads grouped key/value heads without copying them
    inputs = to_model_device(batch["inputs"], model)
    generation_kwargs = cap_new_tokens(model, batch, generation_kwargs)
    generation_kwargs = decode_settings(model, inputs["input_ids"].shape[1], generation_kwargs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), blocks_eager(model):  # training's compiled blocks (--compile_layers)
            sequences = model.generate(**inputs, **generation_kwargs)
    finally:
        model.train(was_training)
    new_tokens = sequences[:, inputs["input_ids"].shape[1] :].tolist()
    eos = _eos_ids(generation_kwargs, model)
    token_ids = []
    for tokens in new_tokens:
        end = next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))
        token_ids.append(tokens[:end])
    tokenizer = vl_processor.tokenizer
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
    return Generation(prompts=batch["prompts"], texts=texts, token_ids=token_ids, sequences=sequences, inputs=inputs)


class RolloutEngine(Protocol):
    """What turns a prompt batch into answers: PPO's rollouts, ``resonance generate`` and GRPO's completions (through
    :func:`decode_settings`, as TRL's trainer calls ``generate`` itself) go through it."""

    def generate(
        self, model: Any, vl_processor: Any, batch: dict[str, Any], generation_kwargs: dict[str, Any]
    ) -> Generation:
        """Answers for a :class:`~resonance.base.collator.VLPromptCollator` batch, sampled from ``model`` as
        ``generation_kwargs`` say (transformers' ``GenerationConfig`` fields)."""
        ...


class TransformersEngine:
    """:func:`generate_from`: transformers' ``generate`` on the training model itself, with the static cache and
    compiled decode step where :func:`decode_settings` chooses them, and LoRA adapters as ``rollout_adapters`` says
    (:func:`adapters_merged`)."""

    def __init__(self, rollout_adapters: str = "auto"):
        check_rollout_adapters(rollout_adapters)
        self.rollout_adapters = rollout_adapters

    def generate(
        self, model: Any, vl_processor: Any, batch: dict[str, Any], generation_kwargs: dict[str, Any]
    ) -> Generation:
        with adapters_merged(model, self.rollout_adapters):
            return generate_from(model, vl_processor, batch, generation_kwargs)


ROLLOUT_ADAPTERS = ("auto", "merged", "separate")


def rollout_adapters_field() -> Any:
    """The dataclass field of ``--rollout_adapters`` (PPO's and GRPO's configs)."""
    return field(
        default="auto",
        metadata={
            "help": "LoRA rollouts: merged (sampled from the base weights with the adapters added in, which are put "
            "back exactly afterwards; a copy of the adapted weights is held meanwhile), separate (through PEFT's "
            "adapter layers: a few small kernels more per layer and token), or auto (merged where the weights "
            "allow: plain LoRA on whole, unquantised linear weights and room for the copy; separate elsewhere, "
            "saying why once in the log). Merged rollouts sample without LoRA dropout, as vLLM rollouts do.",
            "choices": list(ROLLOUT_ADAPTERS),
        },
    )


def check_rollout_adapters(value: str) -> None:
    """A :class:`ConfigError` unless ``value`` is one of :data:`ROLLOUT_ADAPTERS` (``--rollout_adapters``)."""
    if value not in ROLLOUT_ADAPTERS:
        raise ConfigError(f"--rollout_adapters {value}: must be one of {', '.join(ROLLOUT_ADAPTERS)}")


def _adapted_layers(model: Any) -> tuple[list[tuple[Any, list[str]]], str | None]:
    """The LoRA layers of ``model`` whose adapters its forward pass adds now, each with those adapters, and why they
    cannot be merged into their base weights (None where they can)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from torch.distributed.tensor import DTensor

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
            continue
        adapters = [adapter for adapter in module.active_adapters if adapter in module.lora_A]
        if not adapters:
            continue
        if type(module) is not LoraLinear:
            return layers, f"{name} is a {type(module).__name__} (quantised or not a linear layer)"
        weight = module.get_base_layer().weight
        if any(adapter in module.lora_variant for adapter in adapters):
            return layers, f"{name} is not plain LoRA (DoRA or another variant)"
        if any(module.lora_bias[adapter] for adapter in adapters):
            return layers, f"{name}'s adapter has a bias (lora_bias)"
        if getattr(weight, "ds_id", None) is not None:
            return layers, "DeepSpeed ZeRO-3 partitions the weights"
        if isinstance(weight, DTensor) or weight.numel() != module.in_features * module.out_features:
            return layers, "the weights are sharded (FSDP)"
        if not weight.is_floating_point():
            return layers, f"{name}'s weight is {weight.dtype}"
        layers.append((module, adapters))
    return layers, None


def _room_for(tensors: list[torch.Tensor]) -> str | None:
    """Why a copy of ``tensors`` would not fit on their GPU beside a tenth of its memory kept free, or None."""
    device = tensors[0].device
    if device.type != "cuda":
        return None
    size = sum(t.numel() * t.element_size() for t in tensors)
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if size + total // 10 <= free:
        return None
    return (
        f"no room on {device} for a copy of the adapted weights ({size / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free)"
    )


_said: set[str] = set()  # reasons auto kept the adapters separate, already logged


@contextlib.contextmanager
def adapters_merged(model: Any, how: str = "auto") -> Iterator[bool]:
    """``model`` with its active LoRA adapters added into the base weights for the block (yields whether they are):
    each layer's forward is then one matrix product instead of PEFT's three (the adapter's two and the base
    weight's), what decoding many tokens one at a time pays for most. The base weights are copied first and copied
    back on leaving, so training resumes on exactly the weights it left (PEFT's ``unmerge`` subtracts the product
    again, which in bf16 does not give the same weights back). Each merged weight is rounded once: base + B @ A *
    scale computed in float32 (or the weight's dtype, where wider).

    ``how`` is ``--rollout_adapters``: ``"separate"`` leaves the model as it is; ``"merged"`` raises a
    :class:`ConfigError` where the layers cannot be merged; ``"auto"`` merges where :func:`_adapted_layers` and
    :func:`_room_for` allow and says once in the log why not elsewhere. A model without active LoRA layers is left
    as it is."""
    check_rollout_adapters(how)
    layers, reason = _adapted_layers(model) if how != "separate" else ([], None)
    weights = [module.get_base_layer().weight for module, _ in layers]
    if reason is None and weights and how == "auto":
        reason = _room_for(weights)
    if reason is not None:
        if how == "merged":
            raise ConfigError(f"--rollout_adapters merged: {reason}; pass --rollout_adapters auto or separate")
        if reason not in _said:
            _said.add(reason)
            logger.info("Rollouts go through the LoRA adapters' own layers: %s", reason)
    if reason is not None or not layers:
        yield False
        return
    originals: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for (module, adapters), weight in zip(layers, weights, strict=True):
                originals.append(weight.detach().clone())
                merged = weight.to(torch.promote_types(weight.dtype, torch.float32), copy=True)
                for adapter in adapters:
                    merged += module.get_delta_weight(adapter).to(merged.dtype)
                weight.copy_(merged)
                module.merged_adapters = list(adapters)
        yield True
    finally:
        with torch.no_grad():
            for (module, _), weight, original in zip(layers, weights, originals, strict=False):
                weight.copy_(original)
                module.merged_adapters = []


CACHE_CHOICES = ("auto", "static", "dynamic")
CACHE_BUCKET = 256  # static cache lengths are rounded up to this: prompts of other lengths reuse the compiled step


def check_cache_implementation(value: str | None) -> None:
    """A :class:`ConfigError` unless ``value`` is one of :data:`CACHE_CHOICES` or a transformers cache
    (``--cache_implementation``)."""
    from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

    if value is not None and value not in (*CACHE_CHOICES, *ALL_CACHE_IMPLEMENTATIONS):
        choices = ", ".join(dict.fromkeys((*CACHE_CHOICES, *ALL_CACHE_IMPLEMENTATIONS)))
        raise ConfigError(f"--cache_implementation {value}: must be one of {choices}")


def static_cache_by_default(model: Any, generation_kwargs: dict[str, Any]) -> bool:
    """What ``cache_implementation="auto"`` picks: the static cache (and with it transformers' compiled decode step)
    for a model on a CUDA device whose class says it compiles whole (``_can_compile_fullgraph``), unquantised,
    and with whole weights (not in step with other processes, ``synced_gpus``, nor under FSDP or ZeRO-3, which
    gather weights in every forward pass)."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    if generation_kwargs.get("synced_gpus") or generation_kwargs.get("disable_compile"):
        return False
    if is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "hf_quantizer", None) is not None or not getattr(base, "_can_compile_fullgraph", False):
        return False
    device = next(base.parameters()).device
    return device.type == "cuda"


def decode_settings(model: Any, prompt_length: int, generation_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generation_kwargs`` with ``cache_implementation`` decided: ``"auto"`` (or absent) becomes ``"static"`` where
    :func:`static_cache_by_default` says so and is dropped otherwise (transformers' dynamic cache); ``"dynamic"`` is
    dropped too. A static cache is sized for the prompt and ``max_new_tokens`` rounded up to :data:`CACHE_BUCKET`
    (transformers keeps the longest size a model has used, so the compiled decode step is reused by shorter
    prompts). On a GPU transformers then compiles the decode step (``torch.compile``, CUDA graphs); on the CPU it
    does not, and the static cache only changes where the keys and values are kept."""
    cache = generation_kwargs.get("cache_implementation") or "auto"
    if cache == "auto":
        cache = "static" if static_cache_by_default(model, generation_kwargs) else "dynamic"
    settings = {key: value for key, value in generation_kwargs.items() if key != "cache_implementation"}
    if cache == "dynamic":
        return settings
    settings["cache_implementation"] = cache
    new_tokens = generation_kwargs.get("max_new_tokens")
    if new_tokens is not None and cache in ("static", "offloaded_static") and "max_cache_len" not in settings:
        settings["max_cache_len"] = -(-(prompt_length + new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    return settings


def position_limit(model: Any) -> int | None:
    """The text model's ``max_position_embeddings`` (a PEFT model's too), or None where its config has none."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


_capped: set[tuple[int, int]] = set()  # (asked, limit) pairs already warned about: one warning, not one per batch


def cap_new_tokens(model: Any, batch: dict[str, Any], generation_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generation_kwargs`` with ``max_new_tokens`` capped so the prompts (left-padded: the longest sets the
    length) and the answer fit the model's positions, with a warning naming both numbers. A prompt that fills
    every position is a :class:`RowError` naming its row."""
    asked = generation_kwargs.get("max_new_tokens")
    limit = position_limit(model)
    inputs = batch["inputs"]
    length = inputs["input_ids"].shape[1]
    if asked is None or limit is None or length + asked <= limit:
        return generation_kwargs
    if length >= limit:
        rows = batch.get("rows") or [{}]
        mask = inputs.get("attention_mask")
        longest = int(mask.sum(dim=1).argmax()) if mask is not None and len(rows) > 1 else 0
        source = rows[longest].get("source", "a prompt")
        raise RowError(
            f"{source}: the prompt takes {length} tokens, all {limit} positions of the model "
            "(max_position_embeddings) and no room for an answer; shorten it"
        )
    if (asked, limit) not in _capped:
        _capped.add((asked, limit))
        logger.warning(
            "max_new_tokens=%d does not fit the model's %d positions (max_position_embeddings) after a prompt of %d "
            "tokens: capped to %d",
            asked,
            limit,
            length,
            limit - length,
        )
    return {**generation_kwargs, "max_new_tokens": limit - length}


def generation_kwargs(vl_model: Any, model: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The family's defaults (spec ``generation``, with the model's special token ids), then ``overrides``."""
    kwargs = vl_model.prepare_default_generation_kwargs(model.generation_config)
    kwargs.update(overrides or {})
    return kwargs


def load_for_generation(checkpoint: str | Path, device: str | None = None) -> tuple[Any, Any, Any]:
    """``(vl_model class, model, processor)`` for a base checkpoint or a LoRA output folder.

    bf16 on CUDA when available, fp32 on CPU; the model is in eval mode, the processor in inference mode.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vl_model, model, processor = load_unplaced(checkpoint, default_dtype(device))
    return vl_model, model.to(device), processor


def default_dtype(device: str) -> torch.dtype:
    """What generation runs in: bf16 on a GPU, fp32 on the CPU."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_unplaced(checkpoint: str | Path, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """:func:`load_for_generation`'s model where ``from_pretrained`` leaves it: on the CPU, or, in processes that
    ``accelerate launch`` started for FSDP with ``fsdp_cpu_ram_efficient_loading``, on the meta device in all but
    the first (whose weights FSDP then sends to the others)."""
    checkpoint = Path(checkpoint)
    mapper = load_core_mapper(checkpoint)
    vl_model = mapper.model
    model = vl_model.from_pretrained(checkpoint, dtype=dtype).eval()
    processor = mapper.processor(processor_checkpoint(checkpoint), trust_remote_code=vl_model.trust_remote_code)
    processor.infer()
    return vl_model, model, processor
