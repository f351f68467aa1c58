"""Token parity: our processor's batches equal what each family's own HF processor produces.

Reference: ``AutoProcessor.from_pretrained(ckpt).apply_chat_template(conversations, tokenize=True,
return_dict=True, return_tensors="pt", processor_kwargs={"padding": True, "padding_side": "right"})``,
the way transformers documents multimodal chat templating (images inside the image parts).
Ours: ``core_mapper.processor(ckpt).process_batch_conv(canonical_conversations, images)`` in train mode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    FAMILIES,
    PARITY_CASES,
    TEMPLATE_FAMILIES,
    Message,
    has_system,
    hf_batch,
    load_adapter,
    load_hf_processor,
    our_inference_batch,
    prompt_of,
    prompt_only_inputs,
    takes,
    to_hf,
)
from jinja2.exceptions import TemplateError

from resonance.errors import ChatTemplateError, RowError


@pytest.mark.parametrize("case", list(PARITY_CASES))
@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_batch_equals_hf_processor(family: str, case: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    _, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    rows = PARITY_CASES[case]()
    if not processor.takes_system and any(has_system(m) for m, _ in rows):  # spec chat_template.system: false
        _assert_system_refused(processor, hf, rows)
        return
    if not takes(processor, [len(images) for _, images in rows]):
        # A single-image family (spec image.multi_image: false) or one that needs an image in every row
        # (image.required): such rows are refused, not silently misplaced by the processor.
        with pytest.raises(ValueError, match="image"):
            processor.process_batch_conv([m for m, _ in rows], [list(images) for _, images in rows])
        return

    # Like with like: the same image processor class (torchvision's or PIL's) on both sides.
    assert type(processor.image_processor) is type(hf.image_processor)
    ours = processor.process_batch_conv([m for m, _ in rows], [list(images) for _, images in rows])
    reference = hf_batch(hf, [to_hf(m, images, processor.text_messages_as_string) for m, images in rows])
    # Inputs computed from each row's prompt only (spec source: prompt, InstructBLIP's Q-Former text): the HF
    # processor on the turns before the first answer, with the generation prompt, as at inference.
    from_prompts = prompt_only_inputs(processor)
    if from_prompts:
        prompts = hf_batch(
            hf,
            [to_hf(prompt_of(m), images, processor.text_messages_as_string) for m, images in rows],
            add_generation_prompt=True,
        )
        reference.update({name: prompts[name] for name in from_prompts})

    # Every tensor the HF processor returns (ids, mask, all image inputs and grids) is ours, bit for bit.
    assert set(reference.keys()) <= set(ours.keys()), f"missing: {set(reference.keys()) - set(ours.keys())}"
    for key, expected in reference.items():
        assert isinstance(ours[key], torch.Tensor), key
        assert ours[key].dtype == expected.dtype, key
        assert torch.equal(ours[key], expected), f"{key} differs from the HF processor's"

    # The spec's image inputs are real processor outputs, present whenever the batch has an image.
    for name in processor.image_input_names():
        assert name in reference, f"spec image input {name!r} is not an output of the HF processor"
        assert name in ours

    # Train mode pads on the right: each row's mask is ones, then zeros.
    mask = ours["attention_mask"]
    assert torch.equal(mask, mask.sort(dim=1, descending=True).values)
    lengths = mask.sum(dim=1)
    if len(rows) > 1:
        assert lengths.unique().numel() > 1, "test bug: the rows should differ in length"
    assert ours["labels"].shape == ours["input_ids"].shape


def _assert_system_refused(processor: Any, hf: Any, rows: list[tuple[list[Message], list[Any]]]) -> None:
    """A family whose template takes no system message (spec chat_template.system: false): the HF processor's
    template refuses the rows, and ours refuses them by name before rendering."""
    conversations = [to_hf(m, images, processor.text_messages_as_string) for m, images in rows]
    with pytest.raises(TemplateError):
        hf_batch(hf, conversations)
    with pytest.raises(RowError, match=r"^row \d+: a system message, which .* \(spec chat_template.system: false\)"):
        processor.process_batch_conv([m for m, _ in rows], [list(images) for _, images in rows])


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_expand_per_image(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    """A row with two images holds more image tokens than a row with one (the expansion is per image)."""
    ckpt = tiny_checkpoint(family)
    _, processor = load_adapter(ckpt)
    if not processor.multi_image:  # a single-image family refuses the second image
        with pytest.raises(ValueError, match="2 images"):
            processor.process_batch_conv(*zip(*PARITY_CASES["two_images_one_turn"](), strict=True))
        return
    one = processor.process_batch_conv(*zip(*PARITY_CASES["single_turn"](), strict=True))
    two = processor.process_batch_conv(*zip(*PARITY_CASES["two_images_one_turn"](), strict=True))
    count_one = (one["input_ids"] == processor.image_token_id).sum().item()
    count_two = (two["input_ids"] == processor.image_token_id).sum().item()
    assert 0 < count_one < count_two


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_inference_prompts_equal_hf_processor(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Inference mode: generation prompts, left padding, as the HF processor makes them for ``generate``."""
    processor, hf, rows, ours = our_inference_batch(tiny_checkpoint(family))

    def reference_for(padding_side: str):
        return hf.apply_chat_template(
            [to_hf(m, images, processor.text_messages_as_string) for m, images in rows],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": padding_side},
        )

    reference = reference_for("left")
    assert set(reference.keys()) <= set(ours.keys())
    # Inputs computed from the prompt (InstructBLIP's Q-Former text) keep the right padding they have in
    # training: the Q-Former has absolute positions, so left padding would make a batched row differ from the
    # row alone (tests/commands/test_generate.py). Every other input is exactly the HF processor's, left-padded.
    from_prompt = prompt_only_inputs(processor)
    right = reference_for("right") if from_prompt else {}
    for key, expected in reference.items():
        assert torch.equal(ours[key], right[key] if key in from_prompt else expected), key
    mask = ours["attention_mask"]
    # Every row ends with a real token and some row is padded. (The padding need not come first: InstructBLIP's
    # processor puts its query tokens at the very start, before a row's left padding.)
    assert mask[:, -1].all() and not mask.all(), "not left-padded"


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_system_message_renders_as_its_text(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    """A system message reaches the template in a form it reads: its text, never the repr of a parts list.

    (Llama 3.2 Vision's template reads the system content as a string; spec chat_template.text_messages.)
    """
    _, processor = load_adapter(tiny_checkpoint(family))
    ((messages, _),) = PARITY_CASES["system"]()
    if not processor.takes_system:  # spec chat_template.system: false: the template itself refuses the message
        with pytest.raises(ChatTemplateError):
            processor.render_conversation(messages, add_generation_prompt=False)
        return
    text = processor.render_conversation(messages, add_generation_prompt=False)
    assert "You are a helpful assistant. Please answer as well as you can." in text
    assert "'type'" not in text and "[{" not in text
