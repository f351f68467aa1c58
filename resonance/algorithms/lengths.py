"""Row lengths in tokens, image tokens included, for length-grouped sampling without preprocessing the data.

``--train_sampling_strategy group_by_length`` (transformers' ``LengthGroupedSampler``) batches rows of similar
length, so less of each batch is padding. It reads the lengths from a ``length`` column, or from each row's
``input_ids``, which our rows do not have: they are tokenized per batch by the collator. Here each row's
length is computed without decoding its images:

- text: the row's rendered chat template, tokenized as the processor would (one fast tokenizer call per row);
- images: the tokens one image of that size expands to, measured once per distinct size by running the
  family's own processor on a blank image of that size (only the image header of each file is read).

Preference rows count the prompt and the longer answer (the longer of the pair's two rows). The count is exact
up to template whitespace for rows with at most one image; a family that shrinks images in multi-image rows
(LLaVA-OneVision drops its any-resolution tiles) gets an overestimate for those rows, which only coarsens the
grouping.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from resonance.base.processor import VLProcessor

_PROBE = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "x"}]}]


def _text_tokens(processor: VLProcessor, text: str) -> int:
    add_special = processor._adds_special_tokens(text)
    return len(processor.tokenizer(text, add_special_tokens=add_special)["input_ids"])


def image_expansion(processor: VLProcessor, size: tuple[int, int]) -> int:
    """Tokens one image of ``size`` (width, height) adds to a row beyond its placeholder's own text tokens."""
    text = processor.render_conversation(_PROBE, add_generation_prompt=True)
    with_image = processor(text=[text], images=[[Image.new("RGB", size)]])["input_ids"].shape[1]
    return with_image - _text_tokens(processor, text)


def row_lengths(rows: Any, processor: VLProcessor) -> list[int]:
    """The tokens each row of a dataset (SFT ``messages`` or preference ``prompt``/``chosen``/``rejected``
    rows, with their ``images``) will hold once collated, padding excluded."""
    per_size: dict[tuple[int, int], int] = {}

    def image_tokens(path: str) -> int:
        with Image.open(path) as image:  # reads the header only
            size = image.size
        if size not in per_size:
            per_size[size] = image_expansion(processor, size)
        return per_size[size]

    lengths = []
    for row in rows:
        if "messages" in row:
            conversations = [row["messages"]]
        else:
            conversations = [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
        text = max(
            _text_tokens(processor, processor.render_conversation(c, add_generation_prompt=False))
            for c in conversations
        )
        lengths.append(text + sum(image_tokens(path) for path in row["images"]))
    return lengths
