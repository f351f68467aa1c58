"""Each prompt prefilled once when ``generate`` samples several sequences from it (resonance.patches.shared_prefill):
in float64, sampled with one seed, the sequences and every step's logits equal those of a prefill of every copy,
and the prefill embeds one row per prompt where the cache allows it, with transformers' dynamic cache and its static
one."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, write_data

from resonance.base.collator import VLPromptCollator
from resonance.base.model import unwrap
from resonance.data.rows import read_rows
from resonance.generation import load_for_generation, to_model_device
from resonance.patches.shared_prefill import prefill_once

# Families whose prompts are prefilled once per sequence still: their linear-attention layers keep states the cache's
# update does not write.
EVERY_COPY = ["qwen3_5", "qwen3_5_moe"]
# InstructBLIP's generate embeds the prompts itself and hands them to its language model's generate, which the patch
# around the outer model does not reach: nothing changes (GRPO and PPO leave a family with its own generate alone).
OWN_GENERATE = ["instructblip"]
# Mixture-of-experts families, whose grouped matrix products take no float64: compared in float32.
FLOAT32_ONLY = ["qwen3_5_moe", "qwen3_vl_moe"]
COPIES = 3


def _generate(model, inputs: dict, shared: bool, rows: bool = True, **kwargs) -> tuple[list[int], torch.Tensor, tuple]:
    """The rows each forward pass embeds (``rows``: counted, with a hook a compiled step would guard on), the
    sequences and the logits of a sampling ``generate`` (seed 0) of COPIES sequences per prompt, its prompts
    prefilled once each or not."""
    embedded: list[int] = []
    hook = None
    if rows:
        embeddings = unwrap(model).get_input_embeddings()
        hook = embeddings.register_forward_hook(lambda module, args, output: embedded.append(output.shape[0]))
    settings = dict(max_new_tokens=3, do_sample=True, num_return_sequences=COPIES, return_dict_in_generate=True)
    torch.manual_seed(0)
    try:
        with torch.no_grad(), prefill_once(model, COPIES) if shared else nullcontext():
            out = model.generate(**inputs, **settings, output_logits=True, **kwargs)
    finally:
        if hook is not None:
            hook.remove()
    return embedded, out.sequences, out.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_prefilled_once(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    _, model, processor = load_for_generation(tiny_checkpoint(family), device="cpu")
    model.to(torch.float32 if family in FLOAT32_ONLY else torch.float64)
    rows = read_rows(write_data(tmp_path, "prompt"), "prompt", image_placeholder=processor.image_placeholder).rows
    inputs = to_model_device(VLPromptCollator(processor)(rows)["inputs"], model)
    prompts, length = inputs["input_ids"].shape
    assert prompts == 2
    every, every_sequences, every_logits = _generate(model, inputs, shared=False)
    once, once_sequences, once_logits = _generate(model, inputs, shared=True)
    if family in OWN_GENERATE:
        assert once == every
    else:
        assert every[0] == prompts * COPIES and len(every) > 1  # the prefill, then a decode step per new token
        assert once[0] == (prompts * COPIES if family in EVERY_COPY else prompts)
        assert once[1:] == every[1:]  # the decode steps run every sequence
    assert once_sequences.shape[1] > length and torch.equal(once_sequences, every_sequences)
    tolerance = 64 * torch.finfo(once_logits[0].dtype).eps
    for step, (ours, theirs) in enumerate(zip(once_logits, every_logits, strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance, msg=f"step {step}")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "llava"])
def test_static_cache_prefilled_once(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """The static cache (a GPU's default for rollouts) gets every copy's keys and values written by the one prefill:
    Gemma 3's sliding-window layers too."""
    _, model, processor = load_for_generation(tiny_checkpoint(family), device="cpu")
    model.double()
    rows = read_rows(write_data(tmp_path, "prompt"), "prompt", image_placeholder=processor.image_placeholder).rows
    inputs = to_model_device(VLPromptCollator(processor)(rows)["inputs"], model)
    every, every_sequences, every_logits = _generate(model, inputs, shared=False, cache_implementation="static")
    once, once_sequences, once_logits = _generate(model, inputs, shared=True, cache_implementation="static")
    assert every[0] == 2 * COPIES and once[0] == 2
    assert torch.equal(once_sequences, every_sequences)
    for ours, theirs in zip(once_logits, every_logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_compiled_decode_step_reads_the_shared_prefill(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """transformers' compiled decode step (a GPU's default for rollouts with the static cache; compiled on the CPU
    here) decodes from the cache the one prefill wrote as from a prefill of every copy, and compiles nothing more
    for it."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    _, model, processor = load_for_generation(tiny_checkpoint("qwen2_5_vl"), device="cpu")
    model.double()
    rows = read_rows(write_data(tmp_path, "prompt"), "prompt", image_placeholder=processor.image_placeholder).rows
    inputs = to_model_device(VLPromptCollator(processor)(rows)["inputs"], model)
    compiled = CompileConfig(fullgraph=False, dynamic=False)
    compiled._compile_all_devices = True  # transformers compiles the decode step on accelerators only
    torch._dynamo.reset()
    counters.clear()
    settings = dict(rows=False, cache_implementation="static", compile_config=compiled)
    _, every_sequences, every_logits = _generate(model, inputs, shared=False, **settings)
    graphs = counters["stats"]["unique_graphs"]
    _, once_sequences, once_logits = _generate(model, inputs, shared=True, **settings)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs  # compiled, and not again
    assert torch.equal(once_sequences, every_sequences)
    for ours, theirs in zip(once_logits, every_logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("returned", [1, COPIES])
def test_beam_search_prefilled_once(returned: int, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Beam search repeats each prompt once per beam (``resonance generate --num_beams 3``, returning the best beam or
    all 3): prefilled once, it returns the same beams, in float64."""
    _, model, processor = load_for_generation(tiny_checkpoint("qwen2_5_vl"), device="cpu")
    model.double()
    rows = read_rows(write_data(tmp_path, "prompt"), "prompt", image_placeholder=processor.image_placeholder).rows
    inputs = to_model_device(VLPromptCollator(processor)(rows)["inputs"], model)
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=COPIES, num_return_sequences=returned)
    embedded: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, output: embedded.append(output.shape[0]))
    try:
        with torch.no_grad():
            every = model.generate(**inputs, **settings)
            first = len(embedded)
            with prefill_once(model, COPIES):
                once = model.generate(**inputs, **settings)
    finally:
        hook.remove()
    assert embedded[0] == 2 * COPIES and embedded[first] == 2
    assert once.shape == (2 * returned, once.shape[1]) and once.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(once, every)
