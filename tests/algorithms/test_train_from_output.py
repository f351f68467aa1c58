"""A run may start from another run's LoRA output (DPO after SFT, as users chain them): that adapter is merged
into its base and the new run trains a new adapter on top, whose config names the first output as its base, so
loading the second output applies both. A chain that goes round in a circle is one error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import train_argv
from helpers.rows import write_data

from resonance.base.registry import base_model_checkpoint, checkpoint_architecture, lora_base_checkpoint
from resonance.commands.train import main
from resonance.errors import EXIT_OK, CheckpointError
from resonance.generation import load_for_generation


def _logits(checkpoint: Path) -> torch.Tensor:
    """The checkpoint's next-token logits for a fixed text-only prompt, in float64."""
    _, model, processor = load_for_generation(checkpoint, device="cpu")
    ids = processor.hf.tokenizer("USER: What is it? ASSISTANT:", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].double()


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[[str], Path]) -> tuple[Path, ...]:
    """(base, an SFT output trained from it, a DPO output trained from the SFT output at a learning rate
    too small to move its adapter: Adam's first step moves each weight by about the rate)."""
    tmp = tmp_path_factory.mktemp("chain")
    base = tiny_checkpoint("llava")
    sft = tmp / "sft"
    assert main("sft", train_argv("sft", base, write_data(tmp, "sft"), sft)) == EXIT_OK
    dpo = tmp / "dpo"
    assert main("dpo", train_argv("dpo", sft, write_data(tmp, "dpo"), dpo, learning_rate="1e-30")) == EXIT_OK
    return base, sft, dpo


def test_the_second_output_names_the_first_as_its_base(chain: tuple[Path, ...]) -> None:
    base, sft, dpo = chain
    assert json.loads((dpo / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft.resolve())
    assert lora_base_checkpoint(dpo) == sft.resolve()
    assert base_model_checkpoint(dpo).resolve() == base.resolve()
    assert checkpoint_architecture(dpo) == "LlavaForConditionalGeneration"


def test_loading_the_second_output_applies_both_adapters(chain: tuple[Path, ...]) -> None:
    """The DPO adapter is still (all but) zero: its output computes exactly what the SFT output does, which
    is not what the base computes (SFT moved it)."""
    base, sft, dpo = chain
    first, second, plain = _logits(sft), _logits(dpo), _logits(base)
    tolerance = 1e-5 * first.abs().max().item()  # float32 weights; merged and unmerged LoRA round differently
    assert (first - plain).abs().max().item() > 100 * tolerance, "the SFT step did not move the model"
    torch.testing.assert_close(second, first, rtol=0, atol=tolerance)


def test_a_chain_that_goes_round_in_a_circle_is_named(tmp_path: Path) -> None:
    for name, base in (("a", "b"), ("b", "a")):
        (tmp_path / name).mkdir()
        config = {"base_model_name_or_path": str(tmp_path / base)}
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="its base models go round in a circle"):
        checkpoint_architecture(tmp_path / "a")
