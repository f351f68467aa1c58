"""``resonance train X`` flags: every unknown flag and every invalid value in one ConfigError (exit 2), with
did-you-mean, before anything loads; every spelling of a flag counts; LoRA targets the model does not have.

Most tests call :func:`resonance.commands.train.parse` on made-up paths: nothing is loaded, so a refusal here is a
refusal before the model or the data is touched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
from helpers import train_argv
from typer.testing import CliRunner

from resonance.algorithms import ALGORITHMS
from resonance.algorithms.arguments import DataArguments, ModelArguments
from resonance.algorithms.setup import apply_lora
from resonance.base.registry import load_core_mapper
from resonance.cli import app
from resonance.commands.flags import range_problems, train_problems, train_ranges
from resonance.commands.train import parse
from resonance.errors import EXIT_INPUT, ConfigError

REWARD = "helpers.rewards:share_of_target"


def _argv(algorithm: str, tmp_path: Path, **flags: object) -> list[str]:
    online = {"reward_funcs": REWARD} if algorithm in ("grpo", "ppo") else {}
    return train_argv(algorithm, tmp_path / "ckpt", tmp_path / "data.jsonl", tmp_path / "out", **{**online, **flags})


def _refused(algorithm: str, argv: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(algorithm, argv)
    assert caught.value.exit_code == EXIT_INPUT
    return str(caught.value)


# -- unknown flags -------------------------------------------------------------------------------------------


def test_every_unknown_flag_and_invalid_value_in_one_message(tmp_path: Path) -> None:
    argv = [
        *_argv("sft", tmp_path, learning_rate=None),
        "--lerning_rate",
        "1e-4",
        "--per-device-train-batch-size=zero",
        "--gradient_accumulation_steps",
        "0",
        "--lora_dropout",
        "1.5",
        "--max_stesp",
        "3",
    ]
    message = _refused("sft", argv)
    assert message.startswith("5 problems with the flags of resonance train sft:\n")
    lines = message.splitlines()[1:]
    assert "  unknown option --lerning_rate: not a flag of resonance train sft; did you mean --learning_rate?" in lines
    assert "  unknown option --max_stesp: not a flag of resonance train sft; did you mean --max_steps?" in lines
    assert "  --per_device_train_batch_size: invalid int value: 'zero'; must be a whole number >= 1" in lines, message
    assert "  --gradient_accumulation_steps 0: must be a whole number >= 1" in lines
    assert "  --lora_dropout 1.5: must be a number in [0, 1)" in lines


@pytest.mark.parametrize("spelling", ["--lerning-rate=0.1", "--lerning_rate=0.1", "--Lerning_Rate"])
def test_unknown_flag_spellings_get_the_same_suggestion(spelling: str, tmp_path: Path) -> None:
    message = _refused("sft", [*_argv("sft", tmp_path), spelling])
    assert "did you mean --learning_rate?" in message


def test_an_abbreviation_is_not_taken_for_the_flag(tmp_path: Path) -> None:
    """argparse would read --learning 0.5 as --learning_rate 0.5 (and --max_step as --max_steps) without a word."""
    message = _refused("sft", [*_argv("sft", tmp_path), "--learning", "0.5"])
    assert "unknown option --learning: not a flag of resonance train sft; did you mean --learning_rate?" in message


def test_a_flag_of_another_algorithm_says_which(tmp_path: Path) -> None:
    message = _refused("sft", [*_argv("sft", tmp_path), "--beta", "0.1", "--kl_coef", "0.1"])
    assert "unknown option --beta: not a flag of resonance train sft; it is a flag of resonance train dpo and grpo" in (
        message
    )
    assert "unknown option --kl_coef: not a flag of resonance train sft; it is a flag of resonance train ppo" in message


def test_missing_required_flags_are_listed_with_the_rest(tmp_path: Path) -> None:
    message = _refused("sft", ["--output_dir", str(tmp_path), "--lora_r", "0"])
    assert "--model_name_or_path is required" in message and "--data_path is required" in message
    assert "--lora_r 0: must be a whole number >= 1" in message


def test_a_stray_value_is_reported(tmp_path: Path) -> None:
    message = _refused("sft", [*_argv("sft", tmp_path), "--lora_r", "8", "sixteen"])
    assert "unexpected argument 'sixteen'; flags are written --name value" in message


def test_no_args_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HfArgumentParser reads ``<argv[0]>.args`` next to the running script unless told not to: flags nobody gave."""
    script = tmp_path / "resonance"
    script.with_suffix(".args").write_text("--learning_rate 0.5 --max_steps 7\n")
    monkeypatch.setattr(sys, "argv", [str(script)])
    _, _, config = parse("sft", _argv("sft", tmp_path, learning_rate=None, max_steps=None))
    assert config.learning_rate != 0.5 and config.max_steps == -1


# -- every spelling of a given flag wins over our defaults ---------------------------------------------------------


@pytest.mark.parametrize(
    "given", [["--report_to=tensorboard"], ["--report-to", "tensorboard"], ["--report-to=tensorboard"]]
)
def test_report_to_in_any_spelling_is_kept(given: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our default (report_to none) was added whenever ``--report_to`` was not literally in argv."""
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    _, _, config = parse("sft", [*_argv("sft", tmp_path, report_to=None), *given])
    assert config.report_to == ["tensorboard"]


def test_pad_to_multiple_of_in_dash_spelling_is_kept_with_compile_layers(tmp_path: Path) -> None:
    _, _, config = parse("sft", [*_argv("sft", tmp_path, compile_layers=True), "--pad-to-multiple-of=16"])
    assert int(config.pad_to_multiple_of) == 16
    _, _, config = parse("sft", _argv("sft", tmp_path, compile_layers=True))
    assert config.pad_to_multiple_of == 8


# -- values --------------------------------------------------------------------------------------------------------

# Values as the message shows them: parsed (a float flag's 0 is 0.0).
REFUSED = [
    ("sft", "per_device_train_batch_size", "0", "must be a whole number >= 1"),
    ("sft", "gradient_accumulation_steps", "0", "must be a whole number >= 1"),
    ("sft", "lora_r", "0", "must be a whole number >= 1"),
    ("sft", "lora_dropout", "1.5", "must be a number in [0, 1)"),
    ("sft", "learning_rate", "nan", "must be a finite number > 0"),
    ("sft", "learning_rate", "inf", "must be a finite number > 0"),
    ("sft", "learning_rate", "-1.0", "must be a finite number > 0"),
    ("sft", "max_steps", "-5", "must be a whole number >= 1, or -1 to train --num_train_epochs"),
    ("sft", "max_steps", "0", "must be a whole number >= 1, or -1"),
    ("sft", "max_grad_norm", "nan", "must be a finite number >= 0 (0 turns clipping off)"),
    ("sft", "weight_decay", "-0.1", "must be a finite number >= 0"),
    ("dpo", "beta", "0.0", "must be a finite number > 0"),
    ("dpo", "beta", "inf", "must be a finite number > 0"),
    ("dpo", "label_smoothing", "0.5", "must be a number in [0, 0.5)"),
    ("rm", "max_length", "0", "must be a whole number >= 1"),
    ("grpo", "beta", "-1.0", "must be a finite number >= 0 (0 leaves the KL term out)"),
    ("grpo", "temperature", "0.0", "must be a finite number > 0"),
    ("grpo", "num_generations", "1", "must be a whole number >= 2"),
    ("grpo", "top_p", "0.0", "must be a number in (0, 1]"),
    ("ppo", "temperature", "nan", "must be a finite number > 0"),
    ("ppo", "gamma", "1.5", "must be a number in [0, 1]"),
    ("ppo", "cliprange", "0.0", "must be a finite number > 0"),
    ("ppo", "num_mini_batches", "0", "must be a whole number >= 1"),
]


@pytest.mark.parametrize(("algorithm", "flag", "value", "expect"), REFUSED)
def test_invalid_value_is_refused_naming_the_flag_and_range(
    algorithm: str, flag: str, value: str, expect: str, tmp_path: Path
) -> None:
    message = _refused(algorithm, _argv(algorithm, tmp_path, **{flag: value}))
    assert message.startswith(f"--{flag} {value}: {expect}"), message


@pytest.mark.parametrize(
    ("algorithm", "flags"),
    [
        ("sft", {"max_steps": -1, "num_train_epochs": 2}),  # -1: train for the epochs
        ("sft", {"max_steps": 5, "num_train_epochs": 0}),  # max_steps decides; epochs unused
        ("sft", {"max_grad_norm": 0, "weight_decay": 0, "lora_dropout": 0}),
        ("grpo", {"beta": 0, "top_k": 0}),  # GRPO without the KL term; top-k off
        ("dpo", {"label_smoothing": 0.1}),
    ],
)
def test_edge_values_that_make_sense_are_taken(algorithm: str, flags: dict, tmp_path: Path) -> None:
    _, _, config = parse(algorithm, _argv(algorithm, tmp_path, **flags))
    for name, value in flags.items():
        if hasattr(config, name):
            assert getattr(config, name) == value


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_table_takes_every_default(algorithm: str) -> None:
    """No range refuses a default: a run with no flags but the paths is never refused by the table."""
    classes = (ModelArguments, DataArguments, ALGORITHMS[algorithm].config_class())
    defaults = {f.name: f.default for cls in classes for f in fields(cls) if f.default is not MISSING}
    assert range_problems(defaults, train_ranges(algorithm)) == []


def test_flags_defined_elsewhere_are_checked_with_the_rest() -> None:
    """--reward_timeout (GRPO, PPO) and --max_image_pixels are checked where they are used; the table reports them
    with every other problem of the run."""
    problems = train_problems("grpo", {"reward_timeout": float("nan"), "max_image_pixels": -1, "learning_rate": 0})
    assert problems == [
        "--learning_rate 0: must be a finite number > 0",
        "--reward_timeout nan: must be a number of seconds >= 0 (0: no limit)",
        "--max_image_pixels -1: must be a whole number of pixels >= 0 (0: no limit)",
    ]


def test_zero_epochs_without_max_steps_is_refused(tmp_path: Path) -> None:
    message = _refused("sft", _argv("sft", tmp_path, max_steps=None, num_train_epochs=0))
    assert message.startswith("--num_train_epochs 0.0: must be > 0 when --max_steps is -1 (the default)")


def test_bf16_and_fp16_without_a_gpu_that_has_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    message = _refused("sft", _argv("sft", tmp_path, bf16="true", fp16="True"))
    assert "--bf16 true: this machine has no GPU that supports bf16" in message
    assert "--fp16 true: fp16 mixed precision needs a GPU" in message
    # bf16 on the CPU, asked for: what transformers allows
    _, _, config = parse("sft", _argv("sft", tmp_path, bf16="true", use_cpu="true"))
    assert config.bf16 and config.use_cpu


def test_resume_from_a_missing_folder_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "out" / "checkpoint-9"
    message = _refused("sft", _argv("sft", tmp_path, resume_from_checkpoint=missing))
    assert message.startswith(f"--resume_from_checkpoint {missing}: no such folder")
    missing.mkdir(parents=True)
    _, _, config = parse("sft", _argv("sft", tmp_path, resume_from_checkpoint=missing))
    assert config.resume_from_checkpoint == str(missing)


def test_cli_prints_one_message_and_exits_2(tmp_path: Path) -> None:
    argv = [*_argv("dpo", tmp_path), "--gradient_accumulation_steps", "0", "--betta", "0.2"]
    result = CliRunner().invoke(app, ["train", "dpo", *argv])
    assert result.exit_code == EXIT_INPUT, result.output
    assert "Traceback" not in result.output
    assert "error: 2 problems with the flags of resonance train dpo:" in result.stderr
    assert "--gradient_accumulation_steps 0: must be a whole number >= 1" in result.stderr
    assert "unknown option --betta: not a flag of resonance train dpo; did you mean --beta?" in result.stderr
    assert not (tmp_path / "out").exists()


# -- LoRA targets the model does not have ----------------------------------------------------------------------


def test_lora_targets_the_model_does_not_have(tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint("llava")
    model_cls = load_core_mapper(ckpt).model
    model = model_cls.from_pretrained(ckpt)
    args = ModelArguments(model_name_or_path=str(ckpt), lora_target_modules="q_prj, v_proj,vision_tower")
    with pytest.raises(ConfigError) as caught:
        apply_lora(model, model_cls, args)
    message = str(caught.value)
    path = model_cls.language_model_path
    assert message.startswith("--lora_target_modules: ")
    assert f"'q_prj' is no Linear, Embedding or Conv layer under {path}; did you mean 'q_proj'?" in message
    assert "'vision_tower' is no Linear, Embedding or Conv layer" in message and "q_proj" in message
    assert "'v_proj'" not in message

    wrapped = apply_lora(model, model_cls, ModelArguments(str(ckpt), lora_target_modules="q_proj,v_proj"))
    assert any(name.endswith("q_proj.lora_A.default") for name, _ in wrapped.named_modules())


@pytest.mark.parametrize(
    ("launch", "refused"),
    [
        ({}, False),
        ({"FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}, False),
        ({"FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, True),
        ({"FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "3"}, True),  # torch's StateDictType.SHARDED_STATE_DICT
        ({"FSDP_VERSION": "2"}, True),  # accelerate's default for FSDP 2
        ({"FSDP_VERSION": "1"}, False),  # ... and for FSDP 1
    ],
)
def test_an_fsdp_launch_that_would_save_no_output_is_refused(
    launch: dict[str, str], refused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under SHARDED_STATE_DICT transformers' Trainer saves nothing into --output_dir (measured: a two-process SFT
    run ended 'saved' with only README.md there); PPO gathers its output itself and is not refused."""
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_STATE_DICT_TYPE"):
        monkeypatch.delenv(name, raising=False)
    if launch:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    for algorithm in ("sft", "dpo", "rm", "grpo"):
        problems = [p for p in train_problems(algorithm, {}) if "fsdp_state_dict_type" in p]
        assert bool(problems) == refused, (algorithm, problems)
    assert not [p for p in train_problems("ppo", {}) if "fsdp_state_dict_type" in p]
