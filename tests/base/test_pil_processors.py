"""The PIL (slow) image processors still work: torchvision's are transformers' default, not the only choice.

``use_fast=False`` (transformers' older spelling of ``backend="pil"``, still honoured, and the one that also works
for processors with a video processor) reaches the family's processor through ``VLProcessor(path, **kwargs)``.
The batch then equals the HF processor's loaded the same way, and only the pixels differ from the torchvision
processor's, by resampling rounding: the tokens (image token counts included) are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import PARITY_CASES, hf_batch, load_adapter, to_hf
from transformers import AutoImageProcessor, AutoProcessor

# One family per kind of image processing: fixed-size CLIP, dynamic-resolution patches with a video processor
# (Qwen2-VL), tiles with a required video processor (SmolVLM).
FAMILIES = ["llava", "qwen2_vl", "smolvlm"]

# Resampling implementations (PIL's, torchvision's) round differently: a few intensity levels of 255.
LEVELS = 4


@pytest.mark.parametrize("family", FAMILIES)
def test_pil_image_processor(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    mapper, fast = load_adapter(ckpt)
    slow = mapper.processor(ckpt, use_fast=False)
    assert type(slow.image_processor).__name__.endswith("Pil")
    assert not type(fast.image_processor).__name__.endswith("Pil")  # the default is torchvision's

    rows = PARITY_CASES["two_images_two_turns"]()
    messages, images = [m for m, _ in rows], [list(i) for _, i in rows]
    ours = slow.process_batch_conv(messages, images)
    hf = AutoProcessor.from_pretrained(ckpt, use_fast=False)
    reference = hf_batch(hf, [to_hf(m, i, slow.text_messages_as_string) for m, i in rows])
    for key, expected in reference.items():
        assert torch.equal(ours[key], expected), f"{key} differs from the HF PIL processor's"

    default = fast.process_batch_conv(messages, images)
    assert torch.equal(ours["input_ids"], default["input_ids"])
    std = min(slow.image_processor.image_std)
    torch.testing.assert_close(ours["pixel_values"], default["pixel_values"], rtol=0, atol=LEVELS / 255 / std)


def test_spec_backend_is_loaded(tiny_checkpoint: Callable[[str], Path]) -> None:
    """spec image.processor_backend: pil (Mllama) gives our processor the PIL image processor, where plain
    loading gives torchvision's (whose batches with rows without images are wrong in transformers 5.24)."""
    ckpt = tiny_checkpoint("mllama")
    _, processor = load_adapter(ckpt)
    assert type(processor.image_processor).__name__ == "MllamaImageProcessorPil"
    assert type(AutoImageProcessor.from_pretrained(ckpt)).__name__ == "MllamaImageProcessor"
