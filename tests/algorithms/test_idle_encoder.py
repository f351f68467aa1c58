"""A process whose batch has no image still runs the image encoder when other processes may be running it: on one
placeholder image, its output times zero added to the loss (``ImageEncodingMixin._idle_encoder``).

Without it, DDP without ``find_unused_parameters`` (what the Trainer picks under gradient checkpointing) waits
forever for the encoder's gradients on the process that had no image, and FSDP / DeepSpeed ZeRO-3 wait for its
share of the encoder's weights. Here, in one process with the need forced on: the loss and every gradient the batch
gives are exactly what they are without the pass (a product with zero adds exactly 0), and the encoder's trained
weights get zero gradients instead of none: SFT for every family that takes rows without images, DPO and reward
modelling on one. (PPO adds the same term to its loss: ``VLPPOTrainer._loss``.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, read_spec, train_argv
from helpers.rows import write_jsonl

from resonance.algorithms.image_features import ImageEncodingMixin
from resonance.commands.train import build_trainer, parse

TEXT_ONLY = [
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]},
    {"messages": [{"role": "user", "content": "Count to two."}, {"role": "assistant", "content": "One, two."}]},
]
PREFERENCES = [
    {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Seven."},
    {"prompt": "Count to two.", "chosen": "One, two.", "rejected": "Blue."},
]
TAKE_TEXT_ONLY = [family for family in FAMILIES if not read_spec(family).get("image", {}).get("required")]


def _loss_and_gradients(trainer, batch, monkeypatch: pytest.MonkeyPatch, idle: bool):
    monkeypatch.setattr(ImageEncodingMixin, "_encoder_runs_everywhere", lambda self, model, encoder_model: idle)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


CASES = [("sft", family) for family in TAKE_TEXT_ONLY] + [("dpo", "qwen2_vl"), ("rm", "qwen2_vl")]


@pytest.mark.parametrize(("algorithm", "family"), CASES)
def test_the_idle_pass_changes_no_loss_and_no_gradient(
    algorithm: str,
    family: str,
    tiny_checkpoint: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = write_jsonl(tmp_path / "text.jsonl", TEXT_ONLY if algorithm == "sft" else PREFERENCES)
    argv = train_argv(
        algorithm,
        tiny_checkpoint(family),
        data,
        tmp_path / "out",
        lora_target_modules="none",
        freeze_vision_tower=False,
    )
    trainer, _ = build_trainer(algorithm, *parse(algorithm, argv))
    trainer.model.eval()  # no dropout: both passes see the same function
    batch = next(iter(trainer.get_train_dataloader()))
    assert all(batch.get(name) is None for name in trainer.vl_processor.image_input_names())

    plain_loss, plain = _loss_and_gradients(trainer, batch, monkeypatch, idle=False)
    idle_loss, with_idle = _loss_and_gradients(trainer, batch, monkeypatch, idle=True)

    assert torch.equal(idle_loss, plain_loss)
    for name, grad in plain.items():
        if grad is not None:
            assert torch.equal(with_idle[name], grad), name
    encoder = [name for name, grad in plain.items() if grad is None]  # what a text-only batch never reaches
    assert encoder, "every weight had a gradient: the batch did not leave the encoder out"
    reached = [name for name in encoder if with_idle[name] is not None]
    assert reached, "the idle pass reached none of the encoder's weights"
    for name in reached:
        assert not with_idle[name].any(), f"{name}: the idle pass gave it a non-zero gradient"
