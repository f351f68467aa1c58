"""Reward modelling: the Bradley-Terry loss and metrics, pooling, margins, save/reload, learning, CLI, bad input."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_adapter, make_image, preference_rows, run_resonance, save_png, train_argv, write_jsonl

from resonance.algorithms.arguments import ModelArguments
from resonance.algorithms.rm import bradley_terry
from resonance.algorithms.setup import apply_lora
from resonance.base.reward import REWARD_CONFIG, REWARD_HEAD, VLRewardModel, last_token_positions
from resonance.commands.train import build_trainer, main, parse
from resonance.data.rows import load_rows
from resonance.errors import DataError


def _log1p_exp(x: float) -> float:  # -log(sigmoid(x)) = log(1 + exp(-x))
    return math.log(1.0 + math.exp(-x))


# -- loss and metrics ------------------------------------------------------------------------------


def test_bradley_terry_against_hand_computed_values() -> None:
    chosen = torch.tensor([2.0, 0.5, -1.0, 3.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0, -1.0, 0.0])
    margin = torch.tensor([0.5, 0.0, 0.0, 4.0])
    loss, metrics = bradley_terry(chosen, rejected, margin)
    # differences minus margins: 0.5, -0.5, 0.0, -1.0
    expected = (_log1p_exp(0.5) + _log1p_exp(-0.5) + _log1p_exp(0.0) + _log1p_exp(-1.0)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # accuracy compares the rewards only (a tie is wrong; the margin does not count)
    assert metrics["accuracy"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert metrics["reward_gap"].mean().item() == pytest.approx((1.0 - 0.5 + 0.0 + 3.0) / 4)
    assert metrics["chosen_reward"].mean().item() == pytest.approx(4.5 / 4)
    assert metrics["rejected_reward"].mean().item() == pytest.approx(1.0 / 4)
    # the loss pushes every chosen reward up: d loss / d chosen_i = -sigmoid(-(d_i)) / n < 0
    loss.backward()
    grads = [-1 / (1 + math.exp(d)) / 4 for d in (0.5, -0.5, 0.0, -1.0)]
    assert chosen.grad.tolist() == pytest.approx(grads, abs=1e-6)

    no_margin, _ = bradley_terry(torch.tensor([1.0]), torch.tensor([0.0]))
    assert no_margin.item() == pytest.approx(_log1p_exp(1.0), abs=1e-6)
    zero_margin, _ = bradley_terry(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert zero_margin.item() == no_margin.item()


def test_last_token_positions_right_and_left_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_positions(right).tolist() == [2, 4, 0]
    assert last_token_positions(left).tolist() == [4, 4, 4]


# -- model -----------------------------------------------------------------------------------------


def _reward_model(ckpt: Path, lora: str) -> VLRewardModel:
    mapper, _ = load_adapter(ckpt)
    model = mapper.model.from_pretrained(ckpt, dtype=torch.float32)
    mapper.model.freeze_vision_tower(model)
    model = apply_lora(model, mapper.model, ModelArguments(model_name_or_path=str(ckpt), lora_target_modules=lora))
    return mapper.reward_model(model)


def _perturb(reward_model: VLRewardModel) -> None:
    """Move every trainable weight, so a reload that dropped any of them would give other rewards."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in reward_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))


def _rm_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The pair batch for a direct forward: the prompt images repeated for the rejected rows, no margin."""
    return {k: (torch.cat([v, v]) if k == "pixel_values" else v) for k, v in batch.items() if k != "margin"}


@pytest.mark.parametrize("lora", ["auto", "none"])
def test_save_reload_gives_identical_rewards(lora: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint("llava")
    mapper, processor = load_adapter(ckpt)
    processor.train()
    reward_model = _reward_model(ckpt, lora)
    assert reward_model.is_lora == (lora == "auto")
    _perturb(reward_model)
    reward_model.eval()
    batch = mapper.reward_collator(processor)(preference_rows(tmp_path))
    with torch.no_grad():
        rewards = reward_model(**_rm_inputs(batch))
    assert rewards.shape == (2 * batch["margin"].shape[0],) and rewards.dtype == torch.float32

    out = tmp_path / "rm"
    reward_model.save_pretrained(out)
    saved = {p.name for p in out.iterdir()}
    weights = {"adapter_model.safetensors", "adapter_config.json"} if lora == "auto" else {"model.safetensors"}
    assert weights | {REWARD_HEAD, REWARD_CONFIG} <= saved
    description = json.loads((out / REWARD_CONFIG).read_text())
    assert description["backbone"] == ("lora" if lora == "auto" else "full")
    assert description["hf_model_class"] == mapper.model.hf_model_class

    reloaded = VLRewardModel.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is mapper.reward_model
    with torch.no_grad():
        again = reloaded(**_rm_inputs(batch))
    assert torch.equal(again, rewards)

    # The head alone matters: a fresh head gives other rewards (the check above is not vacuous).
    with torch.no_grad():
        fresh = mapper.reward_model(reloaded.model)(**_rm_inputs(batch))
    assert not torch.allclose(fresh, rewards)


def test_rewards_same_with_left_and_right_padding(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint("llava")
    mapper, processor = load_adapter(ckpt)
    reward_model = _reward_model(ckpt, "auto")
    _perturb(reward_model)
    reward_model.eval()
    rows = preference_rows(tmp_path)
    processor.train()
    right = mapper.reward_collator(processor)(rows)
    processor.padding_side = "left"
    left = mapper.reward_collator(processor)(rows)
    assert not right["attention_mask"][:, -1].all() and left["attention_mask"][:, -1].all()
    with torch.no_grad():
        from_right = reward_model(**_rm_inputs(right))
        from_left = reward_model(**_rm_inputs(left))
    torch.testing.assert_close(from_left, from_right, rtol=0, atol=1e-4)


# -- data and collator -----------------------------------------------------------------------------


def _pairs_file(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_margin_column_and_collator(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    rows = [
        {"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No.", "margin": 2},
        {"prompt": "Is grass red?", "chosen": "No.", "rejected": "Yes."},
        {"prompt": "Is snow cold?", "chosen": "Yes.", "rejected": "No.", "margin": -0.25},
    ]
    dataset = load_rows(_pairs_file(tmp_path, rows), "preference")
    assert dataset["margin"] == [2.0, 0.0, -0.25]
    mapper, processor = load_adapter(tiny_checkpoint("llava"))
    processor.train()
    batch = mapper.reward_collator(processor)([dataset[i] for i in range(3)])
    assert batch["margin"].tolist() == [2.0, 0.0, -0.25]
    assert batch["input_ids"].shape[0] == 6 and "completion_mask" not in batch and "labels" not in batch
    # chosen rows first, then rejected rows, as the DPO collator lays them out
    dpo = mapper.dpo_collator(processor)([dataset[i] for i in range(3)])
    assert torch.equal(batch["input_ids"], dpo["input_ids"])

    without = load_rows(_pairs_file(tmp_path, rows[1:2]), "preference")
    assert "margin" not in without.column_names
    assert mapper.reward_collator(processor)([without[0]])["margin"].tolist() == [0.0]


@pytest.mark.parametrize("bad", ["high", None, True, [1], float("nan")])
def test_margin_not_a_number_names_file_and_line(bad: Any, tmp_path: Path) -> None:
    rows = [
        {"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No.", "margin": 1.0},
        {"prompt": "Is grass red?", "chosen": "No.", "rejected": "Yes.", "margin": bad},
    ]
    path = _pairs_file(tmp_path, rows)
    with pytest.raises(DataError) as info:
        load_rows(path, "preference")
    assert info.value.errors == [
        (f"{path}:2", f"margin: must be a number (how far the chosen reward should exceed the rejected one), "
         f"got {bad!r}"),
    ]  # fmt: skip


def test_train_rm_bad_margin_fails_before_loading(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No.", "margin": "a lot"}]
    path = _pairs_file(tmp_path, rows)
    assert main("rm", train_argv("rm", tiny_checkpoint("llava"), path, tmp_path / "out")) == 2
    assert f"{path}:1: margin: must be a number" in capsys.readouterr().err
    assert not (tmp_path / "out" / REWARD_HEAD).exists()


# -- learning --------------------------------------------------------------------------------------

SUBJECTS = ["the cat", "this box", "the sky", "my car", "the tree", "a lamp", "the door", "that cup", "the road"]


def _separable_rows(tmp_path: Path, subjects: list[str], seed: int) -> list[dict[str, Any]]:
    """Chosen answers say "good", rejected ones "bad"; everything else is shared by the pair."""
    rows = []
    for i, subject in enumerate(subjects):
        for j, template in enumerate(["{} looks {}.", "I think {} is {}."]):
            row: dict[str, Any] = {
                "prompt": f"What do you think of {subject}?",
                "chosen": template.format(subject, "good"),
                "rejected": template.format(subject, "bad"),
            }
            if (i + j) % 2 == 0:
                row["images"] = [save_png(tmp_path, f"img{seed}_{i}_{j}.png", make_image(32, 32, seed=seed + i))]
                row["prompt"] = "<image>\n" + row["prompt"]
            rows.append(row)
    return rows


def test_reward_model_learns_separable_preferences(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Held-out pairs are ranked right after a few CPU steps; a flipped loss sign would rank them wrong."""
    train = write_jsonl(tmp_path / "train.jsonl", _separable_rows(tmp_path, SUBJECTS[:6], seed=0))
    held_out = write_jsonl(tmp_path / "eval.jsonl", _separable_rows(tmp_path, SUBJECTS[6:], seed=50))
    argv = train_argv(
        "rm", tiny_checkpoint("llava"), train, tmp_path / "out",
        max_steps=30, per_device_train_batch_size=4, learning_rate="5e-3",
        eval_data_path=held_out, per_device_eval_batch_size=6, seed=0,
    )  # fmt: skip
    model_args, data_args, config = parse("rm", argv)
    torch.manual_seed(0)  # LoRA and head init: the same whatever ran before
    trainer, _ = build_trainer("rm", model_args, data_args, config)

    before = trainer.evaluate()
    if before["eval_accuracy"] > 0.5:  # start from a head that ranks the held-out pairs wrong: learning must fix it
        with torch.no_grad():
            trainer.model.score.weight.neg_()
            trainer.model.score.bias.neg_()
        before = trainer.evaluate()
    assert before["eval_accuracy"] <= 0.5
    trainer.train()
    after = trainer.evaluate()

    assert after["eval_accuracy"] >= 0.9, (before, after)
    assert after["eval_reward_gap"] > 0 and after["eval_loss"] < before["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]

    # The logged eval metrics are the rewards' own statistics.
    trainer.model.eval()
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    with torch.no_grad():
        chosen, rejected = trainer.rewards(trainer.model, batch)
    assert after["eval_accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert after["eval_reward_gap"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert after["eval_chosen_reward"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert after["eval_rejected_reward"] == pytest.approx(rejected.mean().item(), abs=1e-5)


# -- command line ----------------------------------------------------------------------------------


def test_cli_train_rm_end_to_end(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """``resonance train rm ...`` (the installed console script) trains, evaluates and saves a reloadable model."""
    ckpt = tiny_checkpoint("llava")
    rows = _separable_rows(tmp_path, SUBJECTS[:2], seed=0)
    rows[0]["margin"] = 0.5
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    output_dir = tmp_path / "out"
    argv = train_argv(
        "rm", ckpt, data, output_dir, eval_data_path=data, eval_strategy="steps", eval_steps=1,
        gradient_checkpointing=True,  # Trainer passes its own checkpointing options to the model
    )  # fmt: skip
    result = run_resonance("train", "rm", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "eval_accuracy" in result.stdout + result.stderr
    saved = {p.name for p in output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", REWARD_HEAD, REWARD_CONFIG} <= saved
    assert {"tokenizer.json", "processor_config.json"} <= saved
    reloaded = VLRewardModel.from_pretrained(output_dir)
    mapper, processor = load_adapter(output_dir)
    processor.train()
    batch = mapper.reward_collator(processor)(load_rows(data, "preference").to_list()[:2])
    with torch.no_grad():
        rewards = reloaded.eval()(**_rm_inputs(batch))
    assert rewards.shape == (4,) and torch.isfinite(rewards).all()


@pytest.mark.parametrize("lora", ["auto", "none"])
def test_resume_from_checkpoint_restores_backbone_and_head(
    lora: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", _separable_rows(tmp_path, SUBJECTS[:2], seed=0))
    ckpt = tiny_checkpoint("llava")
    flags = {"lora_target_modules": lora, "save_strategy": "steps", "save_steps": 1}
    trainer, _ = build_trainer("rm", *parse("rm", train_argv("rm", ckpt, data, tmp_path / "out", **flags)))
    trainer.train()
    trained = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}

    checkpoint = str(tmp_path / "out" / "checkpoint-1")
    argv = train_argv("rm", ckpt, data, tmp_path / "out", **flags, max_steps=2)
    resumed, _ = build_trainer("rm", *parse("rm", argv))  # fresh head (another random init), base weights
    assert not torch.equal(resumed.model.score.weight, trained["score.weight"])
    resumed._load_from_checkpoint(checkpoint)  # what train(resume_from_checkpoint=...) loads the weights with
    for name, parameter in resumed.model.named_parameters():
        assert torch.equal(parameter, trained[name]), name
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 2
