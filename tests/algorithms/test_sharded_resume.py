"""Resuming from a checkpoint saved by two CPU processes under FSDP 2 (and PPO's under DDP, whose processes' random
streams part) reaches what the uninterrupted run reaches: SFT
(the Trainer's FSDP checkpoint: the model and optimizer state gathered on rank 0, each process's random states) and
PPO (its own loop: accelerate's ``save_state`` / ``load_state``); one process meeting such a checkpoint stops with
a CheckpointError (PPO's own check; the Trainer's: ``guards.check_checkpoint_strategy``). The DeepSpeed ZeRO-3
twins are in ``test_deepspeed_cpu``.

Each check shares one uninterrupted run: two processes train 4 steps (``test_multiprocess``'s sizes and launch
through ``test_fsdp_cpu``'s), saving ``checkpoint-2`` and ``checkpoint-4``; a second launch resumes from
``checkpoint-2`` into another folder and trains steps 3 and 4.

Tolerance: none. The resumed processes repeat the uninterrupted run's steps 3 and 4 with the same operations in the
same order (same process count, same reduce-scatters, same batches) on a state restored bit for bit (fp32 tensors
and random states written and read back unchanged): every logged value and every saved tensor must be equal
(measured: equal, under FSDP and ZeRO-3). A resume that loses part of the state is far from equal: SFT resumed from
the ZeRO-3 checkpoint-2 in one process, where transformers silently starts a fresh optimizer and schedule, logs
learning rate 1e-3 at step 3 (not 5e-4) and ends with every LoRA tensor 0.5 to 0.7 of its norm away; a random state
not restored draws other PPO responses, and other rewards.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import EXAMPLES, REWARDS, train_argv
from helpers.repo import TESTS
from test_fsdp_cpu import _launch, _weights
from test_multiprocess import GLOBAL_BATCH, STEPS

from resonance.algorithms.ppo.checkpoint import PPOCheckpointing
from resonance.commands.train import main
from resonance.errors import CheckpointError

SAVED = STEPS // 2  # the checkpoint resumed from
# PPO: a minibatch of two micro-batches (one optimizer step for both), rewarded by the tokens' sum
PPO = {"reward_funcs": f"{REWARDS}:token_sum_reward", "num_mini_batches": 1, "gradient_accumulation_steps": 2}


def sharded_argv(algorithm: str, ckpt: Path, out: Path, processes: int = 2, **flags: object) -> list[str]:
    """``resonance train ALGORITHM``'s flags for ``processes`` processes: 4 steps of the global batch
    (``test_multiprocess``'s sizes; SFT on its rows, the others on the preference pairs), a checkpoint every 2."""
    data = EXAMPLES / ("sft.jsonl" if algorithm == "sft" else "dpo.jsonl")
    return train_argv(
        algorithm, ckpt, data, out,
        max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // processes, learning_rate="1e-3", lora_dropout=0,
        save_strategy="steps", save_steps=SAVED, **(PPO if algorithm == "ppo" else {}), **flags,
    )  # fmt: skip


def resume_twice(algorithm: str, ckpt: Path, tmp_path: Path, launch, **flags: object) -> tuple[Path, Path]:
    """The uninterrupted run (``tmp_path/straight``) and the run resumed from its ``checkpoint-2``
    (``tmp_path/resumed``), each launched by ``launch(argv)``; ``flags``: more of ``resonance train``'s."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(sharded_argv(algorithm, ckpt, straight, **flags))
    launch(sharded_argv(algorithm, ckpt, resumed, resume_from_checkpoint=straight / f"checkpoint-{SAVED}", **flags))
    return straight, resumed


def assert_resumed_equal(straight: Path, resumed: Path) -> None:
    """The resumed run logged the uninterrupted run's steps (the first two copied from the checkpoint, the last two
    its own) and saved the same tensors, all exactly (see the module docstring); training moved the LoRA weights."""
    states = [out / f"checkpoint-{STEPS}" / "trainer_state.json" for out in (straight, resumed)]
    logs = [json.loads(state.read_text())["log_history"] for state in states]
    # TRL's SFT logs num_tokens, a count it keeps outside the Trainer's state: a resumed run restarts it
    steps = [[_without(entry, "num_tokens") for entry in log if "loss" in entry or "reward" in entry] for log in logs]
    assert [entry["step"] for entry in steps[0]] == list(range(1, STEPS + 1)), logs[0]
    assert steps[1] == steps[0]
    files = [_weights(out) for out in (straight, resumed)]
    assert files[0].keys() == files[1].keys() and "adapter_model.safetensors" in files[0]
    for file, tensors in files[0].items():
        assert files[1][file].keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert files[1][file][name].equal(tensor), f"{file} {name}: the resumed run ends elsewhere"
    lora_b = [t for n, t in files[0]["adapter_model.safetensors"].items() if ".lora_B." in n]  # zero at the start
    assert max(t.abs().max().item() for t in lora_b) > 1e-4, "training did not move the LoRA weights"


def assert_refused_alone(algorithm: str, ckpt: Path, checkpoint: Path, out: Path, capsys, message: str) -> None:
    """One process resuming ``checkpoint`` (saved by two sharded processes) stops with ``message`` before it trains
    (in this process: no launch)."""
    capsys.readouterr()
    argv = sharded_argv(algorithm, ckpt, out, resume_from_checkpoint=checkpoint, use_cpu=True)
    assert main(algorithm, argv) == 2
    error = capsys.readouterr().err
    assert f"error: {message}" in error, error[-2000:]
    assert not (out / f"checkpoint-{STEPS}").exists()


def _without(entry: dict, key: str) -> dict:
    return {k: v for k, v in entry.items() if k != key}


def test_sft_resumes_from_fsdp_checkpoint(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    """The Trainer's FSDP checkpoint (full state dict of the model and optimizer on rank 0) resumes exactly; one
    process without FSDP meeting it stops with a CheckpointError (transformers would stop with a ValueError)."""
    ckpt = tiny_checkpoint("llava")
    straight, resumed = resume_twice("sft", ckpt, tmp_path, lambda argv: _launch("sft", argv, 2))
    checkpoint = straight / f"checkpoint-{SAVED}"
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "rng_state_0.pth", "rng_state_1.pth"} <= {
        path.name for path in checkpoint.iterdir()
    }
    assert_resumed_equal(straight, resumed)
    refusal = "its optimizer state was saved under FSDP, and this run is under neither FSDP nor DeepSpeed on 1"
    assert_refused_alone(
        "sft", ckpt, checkpoint, tmp_path / "alone", capsys, f"--resume_from_checkpoint {checkpoint}: {refusal}"
    )


def test_ppo_resumes_from_fsdp_checkpoint(tiny_checkpoint, tmp_path: Path, monkeypatch, capsys) -> None:
    """PPO under FSDP saves its sharded state with every process (accelerate's ``save_state``) and resumes it
    exactly; one process meeting that checkpoint stops with a CheckpointError before it trains."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS), prepend=os.pathsep)  # --reward_funcs helpers.rewards:...
    ckpt = tiny_checkpoint("llava")
    straight, resumed = resume_twice("ppo", ckpt, tmp_path, lambda argv: _launch("ppo", argv, 2))
    checkpoint = straight / f"checkpoint-{SAVED}"
    sharded = {path.name for path in (checkpoint / "sharded_state").iterdir()}
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= sharded
    assert_resumed_equal(straight, resumed)

    refusal = "saved under FSDP on 2 process(es), and this run is with a whole (unsharded) optimizer state: PPO resumes"
    assert_refused_alone("ppo", ckpt, checkpoint, tmp_path / "alone", capsys, f"{checkpoint}: {refusal}")


def test_ppo_resumes_under_data_parallel_with_each_process_random_stream(
    tiny_checkpoint, tmp_path: Path, monkeypatch
) -> None:
    """Under DDP each process keeps its own random stream, and they part where its responses end at other lengths
    than the other's (no synchronised generation: a process stops sampling when its own responses end): the
    checkpoint holds every process's random states (``rng_state_1.pt`` beside the main process's), and the resumed
    run repeats the uninterrupted one exactly. Before, every process resumed with the main process's states, so
    the second drew other responses from step 3 on."""
    from test_multiprocess import CONFIG as DATA_PARALLEL
    from test_sharded_rollouts import MAX_NEW_TOKENS, uneven_checkpoint

    from resonance.algorithms.ppo.checkpoint import CHECKPOINT_STATE as STATE

    monkeypatch.setenv("PYTHONPATH", str(TESTS), prepend=os.pathsep)  # --reward_funcs helpers.rewards:...
    ckpt = uneven_checkpoint(tiny_checkpoint("llava"), tmp_path)
    two = lambda argv: _launch("ppo", argv, 2, DATA_PARALLEL)  # noqa: E731
    # each micro-batch sampled in its own call (a step's rows in one call end at the same longest length on both
    # processes more often: the streams would seldom part)
    straight, resumed = resume_twice(
        "ppo", ckpt, tmp_path, two, response_length=MAX_NEW_TOKENS, generation_batch_size=GLOBAL_BATCH // 2
    )
    checkpoint = straight / f"checkpoint-{SAVED}"
    streams = [torch.load(checkpoint / name, weights_only=False)["rng"]["torch"] for name in (STATE, "rng_state_1.pt")]
    assert not streams[0].equal(streams[1]), "the processes' random streams never parted: the test would prove nothing"
    assert_resumed_equal(straight, resumed)


def _strategy(kind: str, processes: int, zero_stage: int | None = None) -> dict[str, object]:
    return {"distributed_type": kind, "processes": processes, "zero_stage": zero_stage}


@pytest.mark.parametrize(
    ("saved", "running", "message"),
    [
        (_strategy("FSDP", 2), _strategy("FSDP", 4), "FSDP on 2 process(es), and this run is under FSDP on 4"),
        (_strategy("FSDP", 2), _strategy("DEEPSPEED", 2, 3), "this run is under DEEPSPEED (ZeRO-3) on 2 process(es)"),
        (_strategy("DEEPSPEED", 2, 3), _strategy("DEEPSPEED", 2, 2), "saved under DEEPSPEED (ZeRO-3) on 2 process(es)"),
        (_strategy("MULTI_CPU", 2), _strategy("FSDP", 2), "saved with a whole (unsharded) optimizer state, and this"),
        (None, _strategy("DEEPSPEED", 1, 2), "saved with a whole (unsharded) optimizer state, and this run is under"),
        (_strategy("FSDP", 2), _strategy("FSDP", 2), "sharded_state: not found"),
    ],
    ids=["processes", "strategy", "zero-stage", "whole-to-sharded", "before-strategies", "no-sharded-state"],
)
def test_a_sharded_state_resumes_only_where_it_was_saved(saved, running, message, tmp_path: Path) -> None:
    """Which checkpoints a PPO run refuses (no launch: the check alone, on the strategies recorded in
    ``ppo_state.pt``): a sharded state under another strategy, ZeRO stage or process count, a whole state (also one
    saved before strategies were recorded) under sharding, a sharded one without its folder; whole states resume
    under any process count, and a sharded one where it was saved."""
    sharded = running["distributed_type"] in ("FSDP", "DEEPSPEED")
    run = SimpleNamespace(_strategy=lambda: running, _state_sharded=lambda: sharded)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        PPOCheckpointing._check_strategy(run, tmp_path, {"strategy": saved})
    (tmp_path / "sharded_state").mkdir()
    PPOCheckpointing._check_strategy(run, tmp_path, {"strategy": running})  # where it was saved: resumes
    whole = SimpleNamespace(_strategy=lambda: _strategy("NO", 1), _state_sharded=lambda: False)
    PPOCheckpointing._check_strategy(whole, tmp_path, {"strategy": _strategy("MULTI_CPU", 2)})
    PPOCheckpointing._check_strategy(whole, tmp_path, {})
