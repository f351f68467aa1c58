"""Row lengths for length-grouped sampling (resonance.algorithms.lengths), without preprocessing the data.

The estimate is checked against what the collator really produces: exact up to template whitespace for rows
with at most one image. LLaVA-OneVision gives an image fewer tokens in a multi-image row than alone (no
any-resolution tiles), so for multi-image rows the estimate is an upper bound (up to ~1.5x on the tiny model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    FAMILIES,
    SFT_CASES,
    has_system,
    load_adapter,
    preference_rows,
    sft_rows,
    takes,
    train_argv,
    write_data,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

from resonance.algorithms.lengths import row_lengths
from resonance.commands.train import build_trainer, parse


@pytest.mark.parametrize("family", FAMILIES)
def test_lengths_are_those_the_collator_produces(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    mapper, processor = load_adapter(tiny_checkpoint(family))
    for case in SFT_CASES:  # each case's images in its own folder: the file names repeat across cases
        (tmp_path / case).mkdir()
    rows = [
        row
        for case, items in SFT_CASES.items()
        for row in sft_rows(tmp_path / case, items, source=case)
        if takes(processor, [len(row["images"])], has_system(row["messages"]))
    ]
    collated = [int(mapper.sft_collator(processor)([row])["attention_mask"].sum()) for row in rows]
    (tmp_path / "pairs").mkdir()
    pairs = preference_rows(
        tmp_path / "pairs", processor.images_required, processor.multi_image, processor.takes_system
    )
    mask = mapper.dpo_collator(processor)(pairs)["attention_mask"].sum(1).tolist()
    collated += [max(mask[i], mask[i + len(pairs)]) for i in range(len(pairs))]
    rows += pairs

    for row, estimate, actual in zip(rows, row_lengths(rows, processor), collated, strict=True):
        if len(row["images"]) <= 1:
            assert abs(estimate - actual) <= 2, (row["source"], estimate, actual)
        else:
            assert actual <= estimate <= 1.5 * actual, (row["source"], estimate, actual)


def test_group_by_length_trains_with_computed_lengths(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Without the column, transformers' sampler asks every row for input_ids, which our rows do not have."""
    data = write_data(tmp_path, "sft")
    argv = train_argv(
        "sft", tiny_checkpoint("llava"), data, tmp_path / "out", train_sampling_strategy="group_by_length"
    )
    trainer, processor = build_trainer("sft", *parse("sft", argv))
    lengths = trainer.train_dataset["length"]
    assert lengths == row_lengths(trainer.train_dataset, processor) and lengths[0] != lengths[1]
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    trainer.train()
    assert trainer.state.global_step == 1
