"""Row lengths in tokens, image tokens included, computed without preprocessing the data: for length-grouped
sampling, and to check every row against ``--max_length`` before the first step.

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

:func:`fit_rows` runs before the first step: every row is rendered with the family's chat template (a row it
cannot render is invalid), and every row whose estimate comes near ``--max_length`` is measured exactly by the
collator, so a run never stops at step 13 on an over-long row: all of them are named at once, or dropped up
front with ``--skip_long_rows``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from jinja2 import TemplateError
from PIL import Image

from resonance.base.collator import too_long
from resonance.base.processor import VLProcessor
from resonance.data.images import image_size
from resonance.errors import MAX_LISTED_ERRORS, DataError, ResonanceError, RowError

logger = logging.getLogger("resonance.data")

# The most the estimate falls short of the collated length (template whitespace around an image; the bound
# tests/algorithms/test_lengths.py checks for every family): rows estimated within it of --max_length, or over
# it, are measured exactly by the collator.
LENGTH_SLACK = 2

_PROBE = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "x"}]}]


def _text_tokens(processor: VLProcessor, text: str) -> int:
    add_special = processor._adds_special_tokens(text)
    return len(processor.tokenizer(text, add_special_tokens=add_special)["input_ids"])


def image_expansion(processor: VLProcessor, size: tuple[int, int]) -> int:
    """Tokens one image of ``size`` (width, height) adds to a row beyond its placeholder's own text tokens."""
    text = processor.render_conversation(_PROBE, add_generation_prompt=True)
    with_image = processor(text=[text], images=[[Image.new("RGB", size)]])["input_ids"].shape[1]
    return with_image - _text_tokens(processor, text)


class _Lengths:
    """Renders rows with the family's chat template and estimates their lengths (one image probe per size)."""

    def __init__(self, processor: VLProcessor):
        self.processor = processor
        self.per_size: dict[tuple[int, int], int] = {}

    def render(self, row: Any) -> list[str]:
        """The row's conversations as the collator renders them (a preference row: chosen, then rejected; a prompt
        row: with the generation prompt, as generation is given it); raises what the chat template raises for a
        conversation it cannot render."""
        processor = self.processor
        for key in ("messages", "prompt"):
            if key in row and (problem := processor.system_problem(row[key])) is not None:
                raise RowError(problem)
        if "messages" not in row and "chosen" not in row:  # a prompt row
            return [processor.render_conversation(row["prompt"], add_generation_prompt=True)]
        if "messages" in row:
            conversations = [(row["messages"], 0)]
        else:
            first = len(row["prompt"])
            conversations = [(row["prompt"] + row["chosen"], first), (row["prompt"] + row["rejected"], first)]
        if processor.answer_as_suffix:  # the processor takes the last turn as the answer
            for conversation, first in conversations:
                processor.split_answer(conversation, first)
            return [processor.render_conversation(c, add_generation_prompt=False) for c, _ in conversations]
        return [processor.supervised_text(c, first)[0] for c, first in conversations]

    def estimate(self, row: Any, texts: list[str]) -> int:
        """The row's length from its rendered ``texts``: the longest text's tokens plus its images' tokens."""
        return max(_text_tokens(self.processor, text) for text in texts) + sum(
            self._image_tokens(path) for path in row["images"]
        )

    def _image_tokens(self, path: str) -> int:
        size = image_size(path)  # reads the header only
        if size not in self.per_size:
            self.per_size[size] = image_expansion(self.processor, size)
        return self.per_size[size]


def row_lengths(rows: Any, processor: VLProcessor) -> list[int]:
    """The tokens each row of a dataset (SFT ``messages``, preference ``prompt``/``chosen``/``rejected`` or prompt
    ``prompt`` rows, with their ``images``) will hold once collated, padding excluded."""
    lengths = _Lengths(processor)
    return [lengths.estimate(row, lengths.render(row)) for row in rows]


def fit_rows(rows: Any, collator: Any, skip_invalid_rows: bool) -> Any:
    """``rows`` (a ``datasets.Dataset`` of SFT or preference rows, or None) checked before the first step against
    the family's chat template and processor and the collator's ``max_length``.

    A row the family cannot render is invalid; a row longer than ``max_length`` (the collator's own measure,
    :meth:`~resonance.base.collator._VLCollatorBase.lengths`) is over-long. Unless ``skip_invalid_rows`` /
    the collator's ``skip_long_rows`` drop them (one log line per kind; over-long rows are added to the collator's
    ``skipped_rows``), they are one :class:`DataError` naming every such row by FILE:LINE.
    """
    if rows is None:
        return None
    lengths = _Lengths(collator.processor)
    max_length = collator.max_length
    invalid: dict[int, tuple[str, str]] = {}  # row index -> (source, why)
    long: dict[int, tuple[str, int]] = {}  # row index -> (source, tokens)
    for index, row in enumerate(rows):
        source = row["source"]
        try:
            texts = lengths.render(row)
            length = None if max_length is None else lengths.estimate(row, texts)
            if length is not None and length > max_length - LENGTH_SLACK:
                (length,) = collator.lengths([row])  # exact, where the estimate cannot decide
        except (TemplateError, ValueError) as exc:  # ChatTemplateError, RowError, the processor's own checks
            invalid[index] = (source, _cannot_take(exc, source))
            continue
        if length is not None and length > max_length:
            long[index] = (source, length)
    refused = [] if skip_invalid_rows else list(invalid.items())
    refused += [] if collator.skip_long_rows else [(i, (s, too_long(n, max_length))) for i, (s, n) in long.items()]
    if refused:
        raise DataError(
            [problem for _, problem in sorted(refused)], header=_header(len(rows), invalid, long, max_length)
        )
    dropped = invalid.keys() | long.keys()
    if len(dropped) == len(rows):
        raise DataError(
            [invalid.get(i) or (long[i][0], too_long(long[i][1], max_length)) for i in sorted(dropped)],
            header=f"no rows left: --skip_invalid_rows / --skip_long_rows would drop all {len(rows)} rows",
        )
    for source, message in invalid.values():
        logger.warning("skipping invalid row %s: %s", source, message)
    if invalid:
        logger.warning(
            "dropped %d of %d rows this model family cannot take (--skip_invalid_rows)", len(invalid), len(rows)
        )
    if long:
        collator.skipped_rows += len(long)
        listed = _listed(f"{source} ({n} tokens)" for source, n in long.values())
        logger.warning(
            "dropped %d of %d rows longer than --max_length %d (--skip_long_rows): %s",
            len(long),
            len(rows),
            max_length,
            listed,
        )
    return rows.select([i for i in range(len(rows)) if i not in dropped]) if dropped else rows


def _cannot_take(exc: Exception, source: str) -> str:
    """What a row error says, without the FILE:LINE it is listed under."""
    message = str(exc).removeprefix(f"{source}: ")
    if isinstance(exc, ResonanceError):  # names its own cause (ChatTemplateError: the template's origin)
        return message
    return f"this model family cannot render the conversation: {message}"


def _header(total: int, invalid: dict[int, Any], long: dict[int, Any], max_length: int | None) -> str:
    parts = []
    if invalid:
        parts.append(
            f"{len(invalid)} of {total} rows cannot be rendered for this model family (fix them, or pass"
            " --skip_invalid_rows to drop them)"
        )
    if long:
        parts.append(
            f"{len(long)} of {total} rows are longer than --max_length {max_length} (raise --max_length, shorten"
            " them, or pass --skip_long_rows to drop them)"
        )
    return "; ".join(parts)


def _listed(items: Iterable[str]) -> str:
    items = list(items)
    more = len(items) - MAX_LISTED_ERRORS
    return ", ".join(items[:MAX_LISTED_ERRORS]) + (f" and {more} more" if more > 0 else "")
