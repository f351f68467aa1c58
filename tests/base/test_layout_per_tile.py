"""image.inputs layout ``per_tile``: crops of all images concatenated, a varying number per image.

InternVL's processor tiles each image (crop_to_patches: a grid of tiles plus a thumbnail) and returns
``pixel_values`` of shape (tiles of all images, C, H, W) without the per-image counts, so neither
``per_image`` (one entry per image) nor ``per_patch`` (sized by a grid input) describes it.
"""

from __future__ import annotations

import pydantic
import pytest
import torch

from resonance.base.processor import ImageInput, VLProcessor
from resonance.codegen.schema import Image


def test_per_tile_needs_no_grid_input() -> None:
    image = Image(token="<IMG_CONTEXT>", inputs=[{"name": "pixel_values", "layout": "per_tile"}])
    assert image.inputs[0].layout == "per_tile" and image.grid_input is None
    with pytest.raises(pydantic.ValidationError, match="per_image"):
        Image(token="<IMG_CONTEXT>", inputs=[{"name": "pixel_values", "layout": "per_crop"}])


class _Tiles(VLProcessor):
    image_inputs = [ImageInput("pixel_values", "per_tile")]

    def __init__(self) -> None:  # first_half_images needs no HF processor
        pass


def test_first_half_of_a_dpo_batch_is_the_prompt_images_tiles() -> None:
    # Two prompts' images: 7 tiles (a 3x2 grid + thumbnail) and 1 tile; the DPO batch holds them twice.
    tiles = torch.arange(8 * 3 * 2 * 2, dtype=torch.float32).reshape(8, 3, 2, 2)
    batch = {"pixel_values": torch.cat([tiles, tiles]), "input_ids": torch.zeros(4, 5, dtype=torch.long)}
    half = _Tiles().first_half_images(batch)
    assert list(half) == ["pixel_values"]
    assert torch.equal(half["pixel_values"], tiles)
