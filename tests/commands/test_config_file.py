"""A run config file for ``resonance train X``: ``run.yaml`` first or ``--config run.yaml`` (YAML or JSON), its values
overridden by the command line's flags, and every bad key or value named by file, line and key, all at once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helpers import run_resonance
from helpers.repo import REPO
from test_flags import _refused  # one refusal: a ConfigError, exit 2, its message

from resonance.algorithms import ALGORITHMS
from resonance.commands.train import parse

CONFIGS = REPO / "examples" / "configs"


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_each_example_config_parses(algorithm: str, tmp_path: Path) -> None:
    config_file = CONFIGS / f"{algorithm}.yaml"
    written = yaml.safe_load(config_file.read_text())
    model_args, data_args, config = parse(algorithm, [str(config_file), "--output_dir", str(tmp_path / "out")])
    assert model_args.model_name_or_path == "outputs/quickstart-llava/base"  # the quickstart's tiny model
    assert (REPO / data_args.data_path).is_file()
    assert config.learning_rate == float(written["learning_rate"])
    assert config.output_dir == str(tmp_path / "out")  # the command line wins


def test_command_line_overrides_the_file_in_both_spellings(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("model_name_or_path: ckpt\ndata_path: d.jsonl\noutput_dir: out\nlearning-rate: 1.0e-3\nbeta: 0.3\n")
    _, _, config = parse("dpo", [str(run), "--learning_rate=2e-3"])
    assert (config.learning_rate, config.beta) == (2e-3, 0.3)
    _, _, config = parse("dpo", ["--config", str(run), "--beta", "0.5"])
    assert (config.learning_rate, config.beta) == (1e-3, 0.5)


def test_json_file_with_lists_nulls_and_yaml_style_numbers(tmp_path: Path) -> None:
    run = tmp_path / "run.json"
    values = {"model_name_or_path": "c", "data_path": "d", "output_dir": "o", "loss_type": ["sigmoid", "hinge"]}
    run.write_text(json.dumps({**values, "max_length": None, "learning_rate": "1e-4", "freeze_vision_tower": False}))
    model_args, _, config = parse("dpo", [f"--config={run}"])
    assert config.loss_type == ["sigmoid", "hinge"]
    assert config.max_length is None and config.learning_rate == 1e-4 and model_args.freeze_vision_tower is False


def test_every_problem_of_the_file_at_once_with_its_line(tmp_path: Path) -> None:
    run = tmp_path / "bad.yaml"
    run.write_text(
        "model_name_or_path: c\ndata_path: d\noutput_dir: o\n"
        "learnin_rate: 1.0e-4\n"  # 4: misspelt
        "beta: fast\n"  # 5: wrong type
        "num-train-epochs: 1\nnum_train_epochs: 2\n"  # 7: the same flag twice
        "weight_decay: -1\n"  # 8: out of range
        "packing: true\n"  # 9: another algorithm's flag
        "lr_scheduler_type: linar\n"  # 10: not a choice
    )
    message = _refused("dpo", [str(run), "--max_steps", "0"])
    assert f"{run}:4: learnin_rate: not a setting of resonance train dpo; did you mean learning_rate?" in message
    assert f"{run}:5: beta: fast is not a number" in message
    assert f"{run}:7: num_train_epochs: set again (first on line 6)" in message
    assert f"{run}:8: --weight_decay -1" in message
    assert f"{run}:9: packing: not a setting of resonance train dpo; it is a flag of resonance train sft" in message
    assert f"{run}:10: lr_scheduler_type: linar is not one of linear, cosine" in message
    assert "\n  --max_steps 0: must be" in message  # the command line's own problem, not located in the file
    assert message.startswith("7 problems with the flags of resonance train dpo")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- learning_rate\n", "a run config is a mapping of flag names to values"),
        ("learning_rate: [1\n", ":2: not valid YAML or JSON"),
    ],
)
def test_a_file_that_is_no_mapping(tmp_path: Path, text: str, expected: str) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(text)
    assert expected in _refused("sft", [str(run), "--model_name_or_path", "c", "--data_path", "d", "--output_dir", "o"])


def test_config_flag_problems(tmp_path: Path) -> None:
    assert "cannot read the run config" in _refused("sft", ["--config", str(tmp_path / "missing.yaml")])
    assert "--config needs a value" in _refused("sft", ["--config"])
    (tmp_path / "a.yaml").write_text("seed: 1\n")
    assert "2 run configs given" in _refused("sft", [str(tmp_path / "a.yaml"), "--config", str(tmp_path / "a.yaml")])


def test_a_step_trains_from_the_example_config(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    out = tmp_path / "out"
    result = run_resonance(
        "train", "sft", str(CONFIGS / "sft.yaml"),
        "--model_name_or_path", str(tiny_checkpoint("llava")), "--output_dir", str(out), "--max_steps", "1",
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
