"""Some rows of a collated batch, taken from it instead of collating them again.

A batch's inputs hold an entry per token (``input_ids``, ``attention_mask``, Qwen's ``mm_token_type_ids``), per row
(Mllama's aspect ratios), per image or per tile (the images' pixels, their features, Qwen's ``image_grid_thw``).
:func:`entries_of` takes the entries of some rows from an input whose first dimension is one of these;
:func:`rows_of` takes a left-padded batch's inputs for a run of its rows as the collator would give them for those
rows alone. An input whose first dimension is none of these, or several that choose differently (Qwen's patches of
every image in one run), is a :class:`NotImplementedError`: the caller collates the rows again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def entries_of(value: Any, rows: int, keep: Sequence[int], units: Sequence[Sequence[int]], per_row: bool = True) -> Any:
    """``value`` (an input that is not per token, an image encoder's output, or a dict of them) for the rows
    ``keep`` of a batch of ``rows`` rows: the entries of those rows, where its first dimension has one entry per row
    (unless not ``per_row``) or per unit of one of ``units`` (counts per row of images, tiles). Tensor lists count as
    a first dimension; lists of those (per layer: Qwen3-VL's deepstack features) are taken item by item."""
    if isinstance(value, dict):  # mm_encoder_outputs and the encoders' outputs (ModelOutput is a dict)
        out = type(value)()
        for key, item in value.items():
            out[key] = entries_of(item, rows, keep, units, per_row)
        return out
    tensors = isinstance(value, tuple | list) and value and all(isinstance(v, torch.Tensor) for v in value)
    if isinstance(value, tuple | list) and value and not tensors:
        return type(value)(entries_of(item, rows, keep, units, per_row) for item in value)
    if not (tensors or (isinstance(value, torch.Tensor) and value.dim() >= 1)):
        return value
    size = len(value) if tensors else value.shape[0]
    choices = {tuple(keep)} if per_row and size == rows else set()
    for counts in units:
        if len(counts) == rows and sum(counts) == size:
            starts = [sum(counts[:row]) for row in range(rows)]
            choices.add(tuple(i for row in keep for i in range(starts[row], starts[row] + counts[row])))
    if len(choices) != 1:
        shape = f"{len(value)} tensors" if tensors else f"shape {tuple(value.shape)}"
        raise NotImplementedError(f"an input of {shape} is neither per row nor per image")
    (chosen,) = choices
    return type(value)(value[i] for i in chosen) if tensors else value[list(chosen)]


def rows_of(inputs: dict[str, Any], keep: range, units: Sequence[Sequence[int]]) -> dict[str, Any]:
    """A left-padded batch's ``inputs`` for a run of its rows ``keep``, as collating those rows alone gives them:
    per-token inputs (shaped like ``input_ids`` in their first two dimensions) cut to the rows and to their longest
    prompt, the others by :func:`entries_of`. :class:`NotImplementedError` where a row's padding is not all on its
    left (InstructBLIP's query tokens come before it)."""
    ids = inputs["input_ids"]
    attended = inputs["attention_mask"][keep.start : keep.stop].ne(0)
    counts = attended.sum(dim=1)
    length = ids.shape[1]
    if not torch.equal(attended, torch.arange(length, device=ids.device) >= length - counts[:, None]):
        raise NotImplementedError("a row's padding is not all on its left")
    left = length - int(counts.max())
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == ids.shape:
            out[key] = value[keep.start : keep.stop, left:]
        else:
            # the images' features are per image or tile, never per row (a run of tiles as long as the batch)
            out[key] = entries_of(value, ids.shape[0], list(keep), units, per_row=key != "mm_encoder_outputs")
    return out
