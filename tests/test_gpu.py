"""CUDA checks, run on the device machine (`python -m pytest -m gpu`); CPU CI deselects them.

On a GPU the frozen-vision path, bf16 autocast and the attention choice differ from the CPU run:
one SFT, one DPO, one reward-model, one PPO and one GRPO step per family in bf16, batched bf16 generation, and
--compile_layers (Triton kernels) against eager on three families.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from PIL import Image

pytestmark = pytest.mark.gpu


def _data(tmp_path: Path, kind: str) -> Path:
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (40, 56), (30, 30, 200)).save(tmp_path / "blue.png")
    rows = []
    for i in range(4):
        picture = ["red.png", "blue.png"][i % 2]
        colour = ["red", "blue"][i % 2]
        if kind == "sft":
            rows.append(
                {
                    "image": picture,
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat colour is it?"},
                        {"from": "gpt", "value": f"It is {colour}."},
                    ],
                }
            )
        else:
            rows.append(
                {
                    "image": picture,
                    "prompt": "<image>\nWhat colour is it?",
                    "chosen": f"It is {colour}.",
                    "rejected": "It is green, I think.",
                }
            )
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm"])
def test_one_bf16_step_on_cuda(family: str, algorithm: str, tiny_checkpoint, tmp_path: Path) -> None:
    from resonance.commands.train import build_trainer, parse

    assert torch.cuda.is_available(), "a GPU test: run it on the device machine with -m gpu"
    ckpt = tiny_checkpoint(family)
    argv = [
        "--model_name_or_path",
        str(ckpt),
        "--data_path",
        str(_data(tmp_path, "sft" if algorithm == "sft" else "dpo")),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--bf16",
        "True",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--gradient_checkpointing",
        "True",
    ]
    trainer, _ = build_trainer(algorithm, *parse(algorithm, argv))
    model = trainer.model
    tower = trainer.vl_model.get_vision_tower(model)
    before = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    calls = []
    tower.register_forward_hook(lambda *args: calls.append(1))
    trainer.train()
    assert next(model.parameters()).is_cuda
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert len(calls) == 1, f"vision tower ran {len(calls)} times in one step"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_generation_on_cuda(family: str, tiny_checkpoint, tmp_path: Path) -> None:
    from resonance.data.rows import read_rows
    from resonance.generation import generate_batch, generation_kwargs, load_for_generation

    assert torch.cuda.is_available(), "a GPU test: run it on the device machine with -m gpu"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    prompts = ["<image>\nWhat colour is it?", "<image>\nDescribe the picture in a few words, please."]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"image": "red.png", "prompt": p}) + "\n" for p in prompts))
    vl_model, model, processor = load_for_generation(tiny_checkpoint(family))
    assert next(model.parameters()).is_cuda and next(model.parameters()).dtype == torch.bfloat16
    rows = read_rows(path, "prompt").rows
    kwargs = generation_kwargs(vl_model, model, {"max_new_tokens": 4})
    out = generate_batch(model, processor, vl_model, rows, kwargs)
    assert len(out.token_ids) == 2 and all(1 <= len(ids) <= 4 for ids in out.token_ids)
    assert out.sequences.is_cuda


def _prompts(tmp_path: Path) -> Path:
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (40, 56), (30, 30, 200)).save(tmp_path / "blue.png")
    rows = [{"image": picture, "prompt": "<image>\nWhat colour is it?"} for picture in ("red.png", "blue.png")]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GRPO_UNSUPPORTED = {"instructblip", "mllama"}  # refused: resonance.algorithms.grpo.unsupported_reason, test_grpo.py


ONLINE = [("ppo", f) for f in FAMILIES] + [("grpo", f) for f in FAMILIES if f not in GRPO_UNSUPPORTED]


@pytest.mark.parametrize(("algorithm", "family"), ONLINE)
def test_one_bf16_online_step_on_cuda(family: str, algorithm: str, tiny_checkpoint, tmp_path: Path) -> None:
    """One PPO / GRPO step in bf16 with gradient checkpointing: rollouts on the GPU, the tower unchanged, finite
    metrics (test_ppo.py's reward function, on PYTHONPATH through tests/)."""
    from resonance.commands.train import build_trainer, parse

    assert torch.cuda.is_available(), "a GPU test: run it on the device machine with -m gpu"
    argv = [
        "--model_name_or_path", str(tiny_checkpoint(family)),
        "--data_path", str(_prompts(tmp_path)),
        "--output_dir", str(tmp_path / "out"),
        "--reward_funcs", "test_ppo:token_sum_reward",
        "--max_steps", "1",
        "--per_device_train_batch_size", "2" if algorithm == "ppo" else "4",
        "--learning_rate", "1e-3",
        "--bf16", "True",
        "--save_strategy", "no",
        "--report_to", "none",
        "--logging_steps", "1",
        "--gradient_checkpointing", "True",
    ]  # fmt: skip
    argv += (
        ["--response_length", "4"] if algorithm == "ppo" else ["--max_completion_length", "4", "--num_generations", "2"]
    )
    trainer, _ = build_trainer(algorithm, *parse(algorithm, argv))
    model = trainer.policy if algorithm == "ppo" else trainer.model
    tower = trainer.vl_model.get_vision_tower(model)
    before = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    trainer.train()
    assert next(tower.parameters()).is_cuda
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    history = trainer.log_history if algorithm == "ppo" else trainer.state.log_history
    key = "policy_loss" if algorithm == "ppo" else "loss"
    values = [entry[key] for entry in history if key in entry]
    assert values and all(torch.isfinite(torch.tensor(values)))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "gemma3"])
def test_compiled_layers_match_eager_in_bf16_on_cuda(family: str, tiny_checkpoint, tmp_path: Path) -> None:
    """--compile_layers on CUDA (inductor's Triton kernels): DPO losses as eager ones, to bf16 precision."""
    from torch._dynamo.utils import counters

    from resonance.commands.train import build_trainer, parse

    ckpt, data = tiny_checkpoint(family), _data(tmp_path, "dpo")
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        argv = [
            "--model_name_or_path", str(ckpt),
            "--data_path", str(data),
            "--output_dir", str(tmp_path / f"out{compiled}"),
            "--max_steps", "3",
            "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3",
            "--lora_dropout", "0",
            "--bf16", "True",
            "--save_strategy", "no",
            "--report_to", "none",
            "--logging_steps", "1",
            "--gradient_checkpointing", "True",
            "--compile_layers", str(compiled),
        ]  # fmt: skip
        trainer, _ = build_trainer("dpo", *parse("dpo", argv))
        trainer.train()
        losses[compiled] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if compiled:
            assert counters["stats"]["unique_graphs"] > 0 and not counters["recompile_limit"]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=2e-2, abs=2e-3)
