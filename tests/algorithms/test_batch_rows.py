"""Some rows of a collated batch taken from it (resonance.algorithms.batch_rows), on hand-made batches; PPO's
micro-batches taken this way from each family's real batches are checked in test_ppo."""

from __future__ import annotations

import pytest
import torch

from resonance.algorithms.batch_rows import entries_of, expanded, image_inputs_of, rows_of, units_of

# Three left-padded rows of 2, 4 and 3 tokens; row 1 has two images, the others one.
MASK = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
IMAGES = [1, 2, 1]


def _inputs() -> dict[str, torch.Tensor | dict]:
    ids = torch.arange(12).reshape(3, 4) * MASK
    return {
        "input_ids": ids,
        "attention_mask": MASK,
        "token_type_ids": ids + 100,  # another per-token input
        "aspect_ratio_ids": torch.tensor([7, 8, 9]),  # per row
        "image_grid_thw": torch.arange(4 * 3).reshape(4, 3),  # per image
        "mm_encoder_outputs": {"image": {"pooler_output": tuple(torch.full((2, 5), i) for i in range(4))}},
    }


def test_rows_alone_as_collated_alone() -> None:
    """Rows 2 and 3 hold 3 tokens at most: the column where both are padding goes, as collating them alone pads."""
    part = rows_of(_inputs(), range(1, 3), [IMAGES])
    assert part["input_ids"].tolist() == [[4, 5, 6, 7], [0, 9, 10, 11]]
    assert part["token_type_ids"].tolist() == [[104, 105, 106, 107], [100, 109, 110, 111]]
    part = rows_of(_inputs(), range(2, 3), [IMAGES])
    assert part["input_ids"].tolist() == [[9, 10, 11]] and part["attention_mask"].tolist() == [[1, 1, 1]]
    assert part["aspect_ratio_ids"].tolist() == [9]
    assert part["image_grid_thw"].tolist() == [[9, 10, 11]]  # the batch's fourth image
    assert [int(t[0, 0]) for t in part["mm_encoder_outputs"]["image"]["pooler_output"]] == [3]
    part = rows_of(_inputs(), range(0, 2), [IMAGES])
    assert part["image_grid_thw"].shape[0] == 3 and part["aspect_ratio_ids"].tolist() == [7, 8]


def test_features_are_never_per_row() -> None:
    """Three rows of 2, 1 and 1 images and features of three entries (tiles, not images): the features are not
    taken as per row, though any other input of three entries is."""
    tiles = {"mm_encoder_outputs": {"image": {"pooler_output": torch.arange(3)}}}
    with pytest.raises(NotImplementedError, match="neither per row nor per image"):
        rows_of({**_inputs(), **tiles}, range(0, 1), [[2, 1, 1]])
    assert entries_of(torch.arange(3), 3, [1], [[2, 1, 1]]).tolist() == [1]


def test_refused_where_rows_cannot_be_told_apart() -> None:
    with pytest.raises(NotImplementedError, match="neither per row nor per image"):
        rows_of({**_inputs(), "pixel_values": torch.zeros(9, 2)}, range(0, 1), [IMAGES])  # patches of every image
    with pytest.raises(NotImplementedError, match="neither per row nor per image"):  # 3 rows, 3 images: which?
        entries_of(torch.arange(3), 3, [0], [[2, 0, 1]])
    query_first = {**_inputs(), "attention_mask": torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1]])}
    with pytest.raises(NotImplementedError, match="padding is not all on its left"):
        rows_of(query_first, range(0, 1), [IMAGES])  # InstructBLIP: query tokens, then the padding


def test_image_inputs_by_declared_layout() -> None:
    """Rows 0 and 2 of three (images 1, 2, 1): per_row inputs by row, per_image ones by image, per_patch ones by each
    image's patches (the grid's product: 2, 3, 1 and 4 patches)."""
    grid = torch.tensor([[1, 1, 2], [1, 3, 1], [1, 1, 1], [1, 2, 2]])
    inputs = {
        "pixel_values": torch.arange(10),  # per patch
        "image_grid_thw": grid,
        "pixel_attention_mask": torch.tensor([7, 8, 9]),  # per row
    }
    layouts = {"pixel_values": "per_patch", "image_grid_thw": "per_image", "pixel_attention_mask": "per_row"}
    picked = image_inputs_of(inputs, layouts, "image_grid_thw", [0, 2], IMAGES)
    assert picked["pixel_values"].tolist() == [0, 1, 6, 7, 8, 9]
    assert picked["image_grid_thw"].tolist() == [[1, 1, 2], [1, 2, 2]]
    assert picked["pixel_attention_mask"].tolist() == [7, 9]
    with pytest.raises(NotImplementedError, match="laid out per_tile"):
        image_inputs_of({"pixel_values": torch.zeros(6)}, {"pixel_values": "per_tile"}, None, [0], IMAGES)
    with pytest.raises(NotImplementedError, match="not one per image"):
        image_inputs_of({"pixel_values": torch.zeros(5)}, {"pixel_values": "per_image"}, None, [0], IMAGES)


def test_features_expanded_to_the_rows_that_share_them() -> None:
    """Two encoded images (one group's row each) given to four rows: a tensor per image, a tensor over the images, and
    per layer a tensor per image (Qwen3-VL's deepstack features); features of another count are refused."""
    features = {
        "pooler_output": (torch.tensor([0]), torch.tensor([1])),
        "last_hidden_state": torch.tensor([[3], [4]]),
        "deepstack": [(torch.tensor([5]), torch.tensor([6]))],
    }
    rows = expanded(features, [0, 1, 1, 0], 2)
    assert [int(t) for t in rows["pooler_output"]] == [0, 1, 1, 0]
    assert rows["last_hidden_state"].flatten().tolist() == [3, 4, 4, 3]
    assert [int(t) for t in rows["deepstack"][0]] == [5, 6, 6, 5]
    with pytest.raises(NotImplementedError, match="not one entry per image of 3"):
        expanded(features, [0, 1, 2], 3)


def test_units_of_rows_in_the_order_asked() -> None:
    counts = [2, 0, 3, 1]  # units 0-1, none, 2-4, 5
    assert units_of(counts, [2, 0]) == [2, 3, 4, 0, 1]
    assert units_of(counts, [1, 3]) == [5]
    assert units_of(counts, []) == []
