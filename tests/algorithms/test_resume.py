"""Checkpoints written during training resume through --resume_from_checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import EXAMPLES, train_argv

from resonance.algorithms.guards import check_checkpoint_strategy
from resonance.commands.train import main
from resonance.errors import CheckpointError


def _argv(ckpt: Path, out: Path, steps: int) -> list[str]:
    return train_argv("dpo", ckpt, EXAMPLES / "dpo.jsonl", out, max_steps=steps, save_strategy="steps", save_steps=1)


def test_dpo_checkpoint_resumes(tiny_checkpoint, tmp_path: Path) -> None:
    ckpt, out = tiny_checkpoint("qwen2_vl"), tmp_path / "out"
    assert main("dpo", _argv(ckpt, out, 2)) == 0
    first = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert main("dpo", [*_argv(ckpt, out, 3), "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # the resumed run continued the logged history rather than starting over
    assert state["log_history"][: len(first["log_history"])] == first["log_history"]
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    assert (out / "checkpoint-3" / "processor_config.json").is_file()


# The optimizer-state files each strategy's Trainer checkpoint holds (transformers 5.24, accelerate 1.15, DeepSpeed
# 0.19; as the two-process runs of test_sharded_resume and test_deepspeed_cpu write them).
SAVED = {
    "none": ["optimizer.pt"],
    "fsdp": ["pytorch_model_fsdp.bin", "optimizer.bin"],
    "fsdp, sharded state": ["pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata"],
    "zero3 on 2": [f"global_step2/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)],
}
LAUNCH = {  # what accelerate launch puts in each process's environment
    "one process": {},
    "ddp on 2": {"WORLD_SIZE": "2"},
    "fsdp on 2": {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"},
    "zero3 on 2": {"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"},
    "zero3 on 4": {"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "4"},
}
READABLE = {
    ("none", "one process"),
    ("none", "ddp on 2"),
    ("fsdp", "fsdp on 2"),
    ("fsdp, sharded state", "fsdp on 2"),
    ("zero3 on 2", "zero3 on 2"),
}


@pytest.mark.parametrize("saved", list(SAVED))
@pytest.mark.parametrize("launch", list(LAUNCH))
def test_a_checkpoint_of_another_strategy_is_refused(
    saved: str, launch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before anything loads, a resume whose optimizer state the launch cannot read is a CheckpointError naming both
    strategies (the Trainer would fail inside, or from DeepSpeed silently start a fresh optimizer and schedule)."""
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in LAUNCH[launch].items():
        monkeypatch.setenv(name, value)
    for file in SAVED[saved]:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_bytes(b"")
    if (saved, launch) in READABLE:
        check_checkpoint_strategy(tmp_path)
        return
    with pytest.raises(CheckpointError) as error:
        check_checkpoint_strategy(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "resume with the accelerate config" in message
    assert ("DeepSpeed on 2 processes" if saved.startswith("zero3") else "saved under") in message


def test_a_checkpoint_without_optimizer_state_is_not_judged(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")  # --save_only_model, or PPO's own format
    check_checkpoint_strategy(tmp_path)
