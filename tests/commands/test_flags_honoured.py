"""Every flag ``resonance train X`` accepts is honoured or refused by name: packing and padding-free refused with
why; trackers that are not installed, or that PPO's accelerate cannot drive, refused; --push_to_hub refused offline
and honoured by PPO; the Trainer flags PPO's own loop does not read refused; RM and PPO starting from TRL's
defaults; one boolean rule for train and generate (``--x``, ``--x true|false|yes|no|1|0`` in any case,
``--x=true``, ``--no_x``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trl
from accelerate.tracking import GeneralTracker
from helpers import run_resonance, train_argv
from helpers.rows import write_data
from test_flags import REWARD, _argv, _refused  # the flags tests' own builders: one run's flags, one refusal

from resonance.algorithms.guards import WholeCheckpoints
from resonance.algorithms.ppo.checkpoint import PPOCheckpointing
from resonance.algorithms.ppo.config import VLPPOConfig
from resonance.commands.flags import parse_generation_overrides
from resonance.commands.train import build_trainer, parse
from resonance.errors import EXIT_INPUT, ConfigError, TrainingError


@pytest.mark.parametrize(("algorithm", "flag"), [("sft", "packing"), ("sft", "padding_free"), ("dpo", "padding_free")])
def test_packing_and_padding_free_are_refused_with_why(algorithm: str, flag: str, tmp_path: Path) -> None:
    message = _refused(algorithm, [*_argv(algorithm, tmp_path), f"--{flag}"])
    assert message.startswith(f"--{flag} true: not supported: Resonance's collators build padded batches")
    assert "\n" not in message and "position ids" in message


def test_a_tracker_that_is_not_installed_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: [])
    message = _refused("sft", _argv("sft", tmp_path, report_to="tensorboard,wandb"))
    assert "--report_to tensorboard: the tensorboard package is not installed" in message
    assert "--report_to wandb: the wandb package is not installed" in message
    assert "--report_to tensorbord: not a tracker; did you mean tensorboard?" in _refused(
        "sft", _argv("sft", tmp_path, report_to="tensorbord")
    )


def test_ppo_refuses_a_tracker_accelerate_does_not_drive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["neptune"])
    message = _refused("ppo", _argv("ppo", tmp_path, report_to="neptune"))
    assert "--report_to neptune: resonance train ppo logs through accelerate's trackers: aim" in message


class RecordingTracker(GeneralTracker):
    """A tracker that keeps what it is given (accelerate takes GeneralTracker instances in ``log_with``)."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.finished = False

    @property
    def tracker(self) -> Any:
        return self

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.config = values

    def log(self, values: dict[str, float], step: int | None = None, **kwargs: Any) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


def test_ppo_logs_every_step_to_its_trackers(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    data = write_data(tmp_path, "prompt")
    argv = train_argv(
        "ppo", tiny_checkpoint("llava"), data, tmp_path / "out", reward_funcs=REWARD, max_steps=2, logging_steps=1
    )
    model_args, data_args, config = parse("ppo", argv)
    tracker = RecordingTracker()
    config.report_to = [tracker]  # what --report_to tensorboard becomes, without tensorboard installed
    trainer, _ = build_trainer("ppo", model_args, data_args, config)
    trainer.train()
    assert [step for step, _ in tracker.logged] == [1, 2]
    assert all("reward" in values and "policy_loss" in values for _, values in tracker.logged)
    assert tracker.config["num_ppo_epochs"] == 2 and tracker.finished


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm", "grpo", "ppo"])
def test_push_to_hub_is_refused_offline(algorithm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = _refused(algorithm, [*_argv(algorithm, tmp_path), "--push_to_hub"])
    assert message.startswith("--push_to_hub true: the Hugging Face Hub is offline here (HF_HUB_OFFLINE=1)")


def test_ppo_push_that_fails_says_the_run_is_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the client refuses every call: a failed upload
    args = SimpleNamespace(hub_model_id="me/run", hub_token=None, hub_private_repo=None, hub_revision=None)
    with pytest.raises(TrainingError, match=r"--push_to_hub: could not upload .* as me/run .*the run is saved there"):
        PPOCheckpointing.push_to_hub(SimpleNamespace(args=args), tmp_path)


def _unfinished_output(folder: Path) -> Path:
    """An output as save_pretrained leaves it: the adapter names its base (``base``, in the current folder) by a
    relative path, the weights are 0600."""
    Path("base").mkdir(exist_ok=True)
    Path("base", "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"]}')
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"base_model_name_or_path": "base"}')
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    (folder / "adapter_model.safetensors").chmod(0o600)
    return folder


def _pushed_as_finished(output: Path) -> dict[str, Any]:
    """What the upload would see: the base path and the weights' mode."""
    config = json.loads((output / "adapter_config.json").read_text())
    return {"base": config["base_model_name_or_path"], "mode": (output / "adapter_model.safetensors").stat().st_mode}


def test_push_to_hub_uploads_the_finished_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub copy is the folder as the run leaves it (absolute base path, readable files), for the Trainer-based
    algorithms (transformers pushes inside save_model) and for PPO."""
    monkeypatch.chdir(tmp_path)
    seen: list[dict[str, Any]] = []

    class Trainer:
        def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
            seen.append(_pushed_as_finished(Path(self.args.output_dir)))

    class Pushing(WholeCheckpoints, Trainer):
        args = SimpleNamespace(should_save=True, output_dir=str(_unfinished_output(tmp_path / "trainer")))

    Pushing().push_to_hub(commit_message="End of training")

    output = _unfinished_output(tmp_path / "ppo")
    ppo = SimpleNamespace(
        args=SimpleNamespace(push_to_hub=True, output_dir=str(output)),
        accelerator=SimpleNamespace(wait_for_everyone=lambda: None, is_main_process=True),
        save_outputs=lambda folder, whole: None,
        _whole_state_dict=lambda: None,  # weights whole: nothing to gather
        push_to_hub=lambda folder: seen.append(_pushed_as_finished(folder)),
    )
    PPOCheckpointing.save_model(ppo, output)
    assert len(seen) == 2
    for pushed in seen:
        assert pushed["base"] == str((tmp_path / "base").resolve())
        assert pushed["mode"] & 0o044 == 0o044


def test_rm_and_ppo_start_from_trl_defaults(tmp_path: Path) -> None:
    sft = trl.SFTConfig(output_dir=str(tmp_path), bf16=False)
    rm = parse("rm", _argv("rm", tmp_path, learning_rate=None, logging_steps=None))[2]
    ppo = parse("ppo", _argv("ppo", tmp_path, learning_rate=None, logging_steps=None))[2]
    assert rm.learning_rate == trl.RewardConfig.learning_rate == 1e-4
    assert ppo.learning_rate == trl.GRPOConfig.learning_rate == 1e-6
    assert rm.logging_steps == ppo.logging_steps == sft.logging_steps == 10
    assert rm.gradient_checkpointing and not ppo.gradient_checkpointing  # PPO: rollouts keep the KV cache
    # as TRL's configs: bf16 unless --fp16 (parse turns it off on a machine without a GPU)
    assert type(rm)(output_dir=str(tmp_path), use_cpu=True).bf16 is True
    assert type(ppo)(output_dir=str(tmp_path), reward_funcs="x:y", use_cpu=True).bf16 is True


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        (["--bf16"], True),
        (["--bf16", "true"], True),
        (["--bf16=True"], True),
        (["--bf16", "1"], True),
        (["--bf16", "0"], False),
        (["--bf16=false"], False),
    ],
)
def test_one_boolean_rule(spelling: list[str], expected: bool, tmp_path: Path) -> None:
    config = parse("sft", [*_argv("sft", tmp_path), "--use_cpu", *spelling])[2]
    assert config.bf16 is expected and config.use_cpu is True


def test_no_prefix_turns_a_true_default_off(tmp_path: Path) -> None:
    model_args = parse("sft", [*_argv("sft", tmp_path, freeze_vision_tower=None), "--no_freeze_vision_tower"])[0]
    assert model_args.freeze_vision_tower is False


def test_generate_takes_the_same_boolean_rule() -> None:
    spellings = ["--do_sample", "--use_cache", "0", "--output_scores=YES", "--no-return_dict_in_generate"]
    assert parse_generation_overrides(spellings) == {
        "do_sample": True, "use_cache": False, "output_scores": True, "return_dict_in_generate": False
    }  # fmt: skip
    assert parse_generation_overrides(["--early_stopping", "never"]) == {"early_stopping": "never"}


def test_ppo_refuses_trainer_flags_its_loop_does_not_read(tmp_path: Path) -> None:
    argv = [*_argv("ppo", tmp_path), "--optim", "adafactor", "--neftune_noise_alpha", "5", "--save_only_model"]
    message = _refused("ppo", argv)
    assert message.startswith("3 problems with the flags of resonance train ppo")
    assert "--optim adafactor: not taken by resonance train ppo: its loop steps torch.optim.AdamW" in message
    assert "--neftune_noise_alpha 5.0: not taken" in message and "--save_only_model True: not taken" in message
    assert parse("ppo", [*_argv("ppo", tmp_path), "--optim", "adamw_torch"])[2].learning_rate == 1e-2
    with pytest.raises(ConfigError, match="--deepspeed ds.json: not taken by resonance train ppo"):
        VLPPOConfig(output_dir=str(tmp_path), reward_funcs="x:y", use_cpu=True, deepspeed="ds.json")


def test_ppo_push_to_hub_offline_is_one_line_from_the_command(tmp_path: Path) -> None:
    result = run_resonance("train", "ppo", *_argv("ppo", tmp_path), "--push_to_hub", cwd=tmp_path)  # HF_HUB_OFFLINE=1
    assert result.returncode == EXIT_INPUT
    assert result.stderr.strip().splitlines() == [
        "error: --push_to_hub true: the Hugging Face Hub is offline here (HF_HUB_OFFLINE=1); leave --push_to_hub out "
        "and upload --output_dir later (hf upload REPO OUTPUT_DIR), or unset HF_HUB_OFFLINE"
    ]
