"""Some rows of a collated batch, taken from it instead of collating (or encoding) them again.

A batch's inputs hold an entry per token (``input_ids``, ``attention_mask``, Qwen's ``mm_token_type_ids``), per row
(Mllama's aspect ratios), per image or per tile (the images' pixels, their features, Qwen's ``image_grid_thw``).
:func:`entries_of` takes the entries of some rows from an input whose first dimension is one of these, told apart by
its length; :func:`rows_of` takes a left-padded batch's inputs for a run of its rows as the collator would give them
for those rows alone (PPO's micro-batches). :func:`image_inputs_of` takes some rows' image inputs by the layouts the
spec declares for them, and :func:`expanded` gives each row the features of the row whose images it shares (a GRPO
group's). Where an input cannot be told apart this way (Qwen's patches of every image in one run, features per
tile), a :class:`NotImplementedError` says why: the caller then collates or encodes every row.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


def _taken(value: Any, choose: Callable[[int, str], Sequence[int]]) -> Any:
    """``value`` (a tensor, a list of tensors, or dicts and lists of those) with the entries ``choose(size, shape)``
    names along each first dimension (a list of tensors counts as one); lists of those lists (per layer: Qwen3-VL's
    deepstack features) are taken item by item."""
    if isinstance(value, dict):  # mm_encoder_outputs and the encoders' outputs (ModelOutput is a dict)
        out = type(value)()
        for key, item in value.items():
            out[key] = _taken(item, choose)
        return out
    tensors = isinstance(value, tuple | list) and value and all(isinstance(v, torch.Tensor) for v in value)
    if isinstance(value, tuple | list) and value and not tensors:
        return type(value)(_taken(item, choose) for item in value)
    if not (tensors or (isinstance(value, torch.Tensor) and value.dim() >= 1)):
        return value
    size = len(value) if tensors else value.shape[0]
    chosen = choose(size, f"{len(value)} tensors" if tensors else f"shape {tuple(value.shape)}")
    return type(value)(value[i] for i in chosen) if tensors else value[list(chosen)]


def units_of(counts: Sequence[int], keep: Iterable[int]) -> list[int]:
    """The indices of the rows ``keep``'s units, in that order, in a run of every row's units (``counts[row]``
    each: images, tiles, an image's patches)."""
    starts = list(itertools.accumulate(counts, initial=0))
    return [i for row in keep for i in range(starts[row], starts[row + 1])]


def entries_of(value: Any, rows: int, keep: Sequence[int], units: Sequence[Sequence[int]], per_row: bool = True) -> Any:
    """``value`` (an input that is not per token, an image encoder's output, or a dict of them) for the rows
    ``keep`` of a batch of ``rows`` rows: the entries of those rows, where its first dimension has one entry per row
    (unless not ``per_row``) or per unit of one of ``units`` (counts per row of images, tiles)."""

    def choose(size: int, shape: str) -> Sequence[int]:
        choices = {tuple(keep)} if per_row and size == rows else set()
        for counts in units:
            if len(counts) == rows and sum(counts) == size:
                choices.add(tuple(units_of(counts, keep)))
        if len(choices) != 1:
            raise NotImplementedError(f"an input of {shape} is neither per row nor per image")
        return next(iter(choices))

    return _taken(value, choose)


def expanded(value: Any, index: Sequence[int], size: int) -> Any:
    """``value`` (an image encoder's output of ``size`` images) with the entries ``index`` along each first dimension:
    each row's images' features from the row that shares its images. :class:`NotImplementedError` where a first
    dimension is not ``size`` long (features per tile, or of every image's patches in one run)."""

    def choose(length: int, shape: str) -> Sequence[int]:
        if length != size:
            raise NotImplementedError(f"an encoder output of {shape} is not one entry per image of {size}")
        return index

    return _taken(value, choose)


def image_inputs_of(
    inputs: dict[str, Any], layouts: dict[str, str], grid: str | None, keep: Sequence[int], images: Sequence[int]
) -> dict[str, Any]:
    """The image inputs of the rows ``keep`` as the spec's image.inputs lay them out (``layouts``: name -> layout),
    ``images`` the batch's images per row: per_row inputs by row, per_image ones by image, per_patch ones by each
    image's patches (the product of its ``grid`` input's entry). :class:`NotImplementedError` for other layouts
    (per_tile: the processors drop the tiles' counts) or an input whose length is not what its layout says."""
    chosen = units_of(images, keep)
    out = {}
    for name, layout in layouts.items():
        if name not in inputs:
            continue
        value = inputs[name]
        if layout == "per_row":
            expected, index = len(images), list(keep)
        elif layout == "per_image":
            expected, index = sum(images), chosen
        elif layout == "per_patch" and grid in inputs:
            patches = inputs[grid].prod(dim=-1).tolist()
            expected, index = sum(patches), units_of(patches, chosen)
        else:
            raise NotImplementedError(f"{name} is laid out {layout}")
        if len(value) != expected:
            raise NotImplementedError(f"{name} holds {len(value)} entries, not one per {layout[4:]} ({expected})")
        out[name] = value[index] if isinstance(value, torch.Tensor) else type(value)(value[i] for i in index)
    return out


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
