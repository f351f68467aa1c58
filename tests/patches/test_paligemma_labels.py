"""PaliGemma's processor on unpadded prompts of two lengths, as TRL's GRPOTrainer tokenizes them
(resonance.patches.paligemma_labels): labels per row, the prompt's positions -100, the token ids untouched; a padded
batch keeps the processor's own arrays."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from helpers import make_image
from transformers import AutoProcessor

from resonance.patches import paligemma_labels


def test_unpadded_rows_of_two_lengths(tiny_checkpoint: Callable[[str], Path]) -> None:
    paligemma_labels.install()
    paligemma_labels.install()  # twice: still one wrapper
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("paligemma"))
    images = [make_image(32, 32, seed=1), make_image(32, 32, seed=2)]
    texts = ["<image>short", "<image>a much longer question about the picture"]
    out = processor(images=images, text=texts, suffix=["yes", "no"])
    ids, types, labels = out["input_ids"], out["token_type_ids"], out["labels"]
    assert len(ids[0]) != len(ids[1])
    for row_ids, row_types, row_labels in zip(ids, types, labels, strict=True):
        assert isinstance(row_labels, list)  # as the ids are: TRL pads lists of lists, stacks anything else
        assert row_labels == [-100 if kind == 0 else token for token, kind in zip(row_ids, row_types, strict=True)]
        assert -100 not in row_ids and any(kind == 1 for kind in row_types)  # the suffix is kept as labels
    padded = processor(images=images, text=texts, suffix=["yes", "no"], padding=True, return_tensors="np")
    assert isinstance(padded["labels"], np.ndarray) and padded["labels"].shape == padded["input_ids"].shape
