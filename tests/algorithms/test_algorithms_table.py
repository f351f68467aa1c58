"""resonance.algorithms.ALGORITHMS: every row resolves, and it alone drives `resonance train X`."""

from __future__ import annotations

import dataclasses
import inspect

from transformers import TrainingArguments
from typer.testing import CliRunner

from resonance.algorithms import ALGORITHMS
from resonance.base.registry import ModelCoreMapper
from resonance.cli import app


def test_every_row_resolves_to_a_config_a_builder_and_core_mapper_slots() -> None:
    slots = {field.name for field in dataclasses.fields(ModelCoreMapper)}
    for name, algorithm in ALGORITHMS.items():
        assert algorithm.name == name
        assert issubclass(algorithm.config_class(), TrainingArguments), name
        assert list(inspect.signature(algorithm.builder()).parameters) == [
            "mapper",
            "model_args",
            "data_args",
            "config",
        ], name
        assert set(algorithm.slots) <= slots, (name, set(algorithm.slots) - slots)
        assert algorithm.data in ("sft", "preference", "prompt"), name


def test_train_subcommands_are_the_table() -> None:
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for name, algorithm in ALGORITHMS.items():
        assert name in result.output
        assert algorithm.help.split(".")[0][:30] in " ".join(result.output.split())
