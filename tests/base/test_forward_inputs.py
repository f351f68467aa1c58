"""Every per-row tensor a collator makes reaches the model's forward unchanged, through our trainers.

Besides input_ids and attention_mask, processors return per-row tensors the model needs for the right
attention: Gemma 3's token_type_ids (bidirectional attention inside each image; without them forward silently
falls back to a causal mask), PaliGemma's prefix-LM token_type_ids, Qwen's mm_token_type_ids. They are not
image inputs (each row has its own, so a DPO batch holds them for chosen and rejected rows alike) and must
survive the trainers' image handling: SFT's forward, DPO's policy and reference forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAMILIES, takes_system, train_argv, write_data

from resonance.base.model import unwrap
from resonance.commands.train import build_trainer, parse

NOT_FORWARDED = {"labels", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_row_inputs_reach_forward(
    family: str, algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    ckpt = tiny_checkpoint(family)
    argv = train_argv(algorithm, ckpt, write_data(tmp_path, algorithm, takes_system(ckpt)), tmp_path / "out")
    model_args, data_args, config = parse(algorithm, argv)
    trainer, processor = build_trainer(algorithm, model_args, data_args, config)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    image_keys = set(processor.image_input_names()) | {processor.image_grid_input}
    row_keys = sorted(set(batch) - NOT_FORWARDED - image_keys)
    assert {"input_ids", "attention_mask"} <= set(row_keys)
    rows = batch["input_ids"].shape[0]
    for key in row_keys:
        assert batch[key].shape[0] == rows, key

    calls: list[dict[str, Any]] = []
    handle = unwrap(trainer.model).register_forward_pre_hook(
        lambda _module, _args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    try:
        trainer.model.train()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, dict(batch))
    finally:
        handle.remove()

    assert len(calls) >= (1 if algorithm == "sft" else 2)  # DPO: policy, then the reference adapter
    for kwargs in calls:
        for key in row_keys:
            assert key in kwargs, f"{key} did not reach forward"
            assert torch.equal(kwargs[key], batch[key]), key
