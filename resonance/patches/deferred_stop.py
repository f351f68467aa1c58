"""transformers 5.24-5.25: on CUDA, ``generate`` makes the host wait for the device after every token.

Its sampling loop reads ``unfinished_sequences.max() == 0`` each step (``StopCheck``), which blocks the host until the
GPU has run the step, so the host cannot queue the next step meanwhile. transformers has the remedy,
``DeferredStopCheck``: the flag is copied asynchronously and read one step late, at the cost of one more forward pass
whose token is dropped (none where ``max_new_tokens`` ends the loop: that stop is known on the host). It turns it on
only on MPS ("we should enable it for cuda if we observe perf gains"). On an H200 (Qwen2.5-VL-3B shape, batch 32,
static cache and compiled decode step) it took a decode step from 12.9 ms to 8.7 ms (benchmarks/NOTES.md section 13).

Here it is on for CUDA as well, under the conditions transformers sets for MPS (not an assistant model's decoding; a
cache handed back to the caller only if it can be cropped), and not where several processes generate in step
(``torch.distributed`` with more than one process: ``synced_gpus`` keeps finished processes running dummy steps, a
combination transformers has not tried deferral with). A no-op when installed twice.
"""

from __future__ import annotations

from typing import Any

import torch


def defers(device: torch.device, cache: Any, cache_is_returned: bool, is_assistant: bool) -> bool | None:
    """Whether a CUDA decode loop reads its stop flag a step late; ``None`` for other devices (transformers decides)."""
    if device.type != "cuda":
        return None
    if is_assistant:
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return False
    return cache is None or bool(cache.is_croppable) or not cache_is_returned


def install() -> None:
    from transformers.generation.utils import DeferredStopCheck

    original = DeferredStopCheck.is_supported
    if getattr(original, "_resonance_cuda", False):
        return

    def is_supported(device: torch.device, cache: Any, cache_is_returned: bool, is_assistant: bool) -> bool:
        decided = defers(device, cache, cache_is_returned, is_assistant)
        return original(device, cache, cache_is_returned, is_assistant) if decided is None else decided

    is_supported._resonance_cuda = True  # type: ignore[attr-defined]
    is_supported.__wrapped__ = original  # type: ignore[attr-defined]  (transformers' own decision)
    DeferredStopCheck.is_supported = staticmethod(is_supported)
