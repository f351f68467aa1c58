"""transformers 5.25: ``generate`` with ``num_return_sequences`` prefills every copy of each prompt.

It repeats each prompt's rows ``num_return_sequences`` times (``_expand_inputs_for_generation``: the copies side by
side) before its prefill, so a GRPO group's prompt, images included, runs through the language model once per
completion: for 4 prompts of 4 completions, 16 prompt rows where 4 hold everything the decoding reads.

:func:`prefill_once`, around one ``generate`` call, prefills one copy of each prompt and writes every key and value
it computes ``copies`` times into the call's own cache (the one the decode steps read, and that a compiled decode
step was traced with), and repeats the prefill's logits; decoding then starts from what a prefill of every copy
gives. The model's ``_prefill`` is wrapped for the call (an attribute of the model object, removed after it).
Where the cache is not transformers' dynamic or static cache of attention layers only (linear attention, as
Qwen3.5's, keeps states the cache's ``update`` does not write), with chunked prefill, or where ``generate`` returns
the prefill's attentions or hidden states (one copy's), the prefill runs as it does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _shareable(cache: Any) -> bool:
    from transformers.cache_utils import (
        DummyLayer,
        DynamicCache,
        DynamicLayer,
        DynamicSlidingWindowLayer,
        StaticCache,
        StaticLayer,
        StaticSlidingWindowLayer,
    )

    # DummyLayer: a layer that reads another layer's keys and values (Gemma 4) and stores none
    layers = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer, DummyLayer)
    return (
        type(cache) in (DynamicCache, StaticCache)
        and not cache.offloading
        and all(type(layer) in layers for layer in cache.layers)
    )


def _writing_copies(cache: Any, copies: int) -> Any:
    """``cache`` as one copy of each prompt's rows sees it: ``update`` writes each row's keys and values into its
    ``copies`` rows of ``cache`` and returns the first copy's."""

    class Repeated(type(cache)):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
            keys, values = cache.update(
                key_states.repeat_interleave(copies, dim=0),
                value_states.repeat_interleave(copies, dim=0),
                layer_idx,
                *args,
                **kwargs,
            )
            return keys[::copies], values[::copies]

    view = object.__new__(Repeated)
    view.__dict__ = cache.__dict__  # the same layers: what the view writes, the cache holds
    return view


def encoder_outputs_copy(encoded: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``mm_encoder_outputs`` (modality -> encoder output) for ``generate``, which repeats each output's
    fields for its sequences in place: the given outputs stay as they are."""
    return {modality: type(out)(**out) for modality, out in encoded.items()}


def _unexpanded(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate``'s model inputs before it repeats them for each sequence, the multimodal encoder outputs copied."""
    kept = dict(model_kwargs)
    encoded = kept.get("mm_encoder_outputs")
    if isinstance(encoded, dict):
        kept["mm_encoder_outputs"] = encoder_outputs_copy(encoded)
    return kept


@contextlib.contextmanager
def prefill_once(model: Any, copies: int) -> Iterator[None]:
    """Around ``model.generate(...)`` sampling ``copies`` sequences per prompt: each prompt is prefilled once. The
    prefill takes the inputs ``generate`` had before it repeated them (its ``_expand_inputs_for_generation``, also
    wrapped for the call: transformers encodes the images before it, once per prompt)."""
    prefill = getattr(model, "_prefill", None)
    expand = getattr(model, "_expand_inputs_for_generation", None)
    if copies < 2 or prefill is None or expand is None:
        yield
        return
    before: dict[str, Any] = {}

    def recorded(*args: Any, **kwargs: Any) -> Any:
        before.clear()
        before.update(_unexpanded(kwargs))
        return expand(*args, **kwargs)

    def once(input_ids: torch.Tensor, generation_config: Any, model_kwargs: dict[str, Any], *args, **kwargs) -> Any:
        cache = model_kwargs.get("cache")
        rows = input_ids.shape[0]
        ids = before.get("input_ids")
        if (
            ids is None
            or ids.shape[0] * copies != rows
            or before.get("expand_size") != copies
            or cache is None
            or not _shareable(cache)
            or getattr(generation_config, "prefill_chunk_size", None) is not None
            or generation_config.output_attentions
            or generation_config.output_hidden_states
        ):
            return prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
        one_copy = {}
        for key, value in model_kwargs.items():
            if key in before:  # as generate had it, before repeating it
                one_copy[key] = before[key]
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
                one_copy[key] = value[::copies]
            else:
                one_copy[key] = value
        one_copy["cache"] = _writing_copies(cache, copies)
        outputs = prefill(ids, generation_config, one_copy, *args, **kwargs)
        outputs["logits"] = outputs.logits.repeat_interleave(copies, dim=0)
        if "cache" in outputs:
            outputs["cache"] = cache
        return outputs

    model._expand_inputs_for_generation = recorded
    model._prefill = once
    try:
        yield
    finally:
        del model._prefill, model._expand_inputs_for_generation
