"""transformers' deferred stop check, on for CUDA too (resonance.patches.deferred_stop): when it applies, and, on a
GPU, that it changes no token of what generate returns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.utils import DeferredStopCheck

from resonance.generation import generation_kwargs, load_for_generation
from resonance.patches import deferred_stop

CUDA, CPU, MPS = torch.device("cuda", 0), torch.device("cpu"), torch.device("mps")


def test_cuda_defers_as_transformers_lets_mps() -> None:
    deferred_stop.install()
    deferred_stop.install()  # twice: still one wrapper
    croppable, fixed = SimpleNamespace(is_croppable=True), SimpleNamespace(is_croppable=False)
    assert DeferredStopCheck.is_supported(CUDA, None, False, is_assistant=False)
    assert DeferredStopCheck.is_supported(CUDA, fixed, False, is_assistant=False)  # a cache not handed back
    assert DeferredStopCheck.is_supported(CUDA, croppable, True, is_assistant=False)
    assert not DeferredStopCheck.is_supported(CUDA, fixed, True, is_assistant=False)  # could not undo the extra step
    assert not DeferredStopCheck.is_supported(CUDA, None, False, is_assistant=True)
    for device in (CPU, MPS):  # transformers' own answers
        for args in ((None, False, False), (fixed, True, False), (None, False, True)):
            assert DeferredStopCheck.is_supported(device, *args) == DeferredStopCheck.is_supported.__wrapped__(
                device, *args
            )


@pytest.mark.gpu
def test_deferred_stop_changes_no_token(tiny_checkpoint: Callable[[str], Path]) -> None:
    """Sampled with one seed, with end-of-sequence tokens early enough to stop rows and the loop (the step after the
    last is run, then dropped), generate returns the same tokens with the check deferred as without."""
    assert torch.cuda.is_available(), "a GPU test: run it on the device machine with -m gpu"
    vl_model, model, processor = load_for_generation(tiny_checkpoint("qwen2_5_vl"))
    ids = torch.randint(10, 100, (4, 6), generator=torch.Generator().manual_seed(0)).cuda()
    vocab = model.get_output_embeddings().weight.shape[0]
    ends = list(range(100, vocab, 2))  # half the vocabulary above the prompt's ids: every row ends within a few steps
    kwargs = generation_kwargs(vl_model, model, {"max_new_tokens": 24, "do_sample": True, "eos_token_id": ends})
    kwargs["pad_token_id"] = processor.tokenizer.pad_token_id
    outputs = {}
    for deferred in (False, True):
        original = DeferredStopCheck.is_supported
        if deferred:
            deferred_stop.install()
        else:
            DeferredStopCheck.is_supported = staticmethod(getattr(original, "__wrapped__", original))
        try:
            torch.manual_seed(0)
            outputs[deferred] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        finally:
            DeferredStopCheck.is_supported = original
    assert torch.equal(outputs[False], outputs[True])
    assert outputs[True].shape[1] < 6 + 24  # the loop stopped on end-of-sequence tokens, before max_new_tokens
