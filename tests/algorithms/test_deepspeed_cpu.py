"""Two CPU processes under DeepSpeed ZeRO-3 (gloo) train exactly like one process with the same global batch: SFT,
DPO and RM, and SFT under ZeRO-2; PPO under ZeRO-3 exactly like two processes under DDP; SFT where every step one
process's row has an image and the other's has none. SFT and PPO resumed from the two processes' ZeRO-3 checkpoint
reach exactly what they reached (``test_sharded_resume``'s checks, the FSDP twins there).

This module runs only where DeepSpeed is installed (the ``deepspeed`` extra; CI installs it): it imports
``deepspeed``, so a suite without it fails here at collection instead of passing without these tests.

As ``test_multiprocess`` (whose runner and batch sizes this reuses): the tiny LLaVA, 4 steps of 4 rows from the
example data (16 rows), two processes with 2 rows each against one process with 4. The two processes are
launched with the shipped ``configs/accelerate/zero3_cpu_2proc.yaml`` (``--zero_stage 2`` on the launch line for
ZeRO-2). Its ``use_cpu`` is false: accelerate starts DeepSpeed's processes (through torchrun), and keeps
DeepSpeed in them, only then. Under DeepSpeed ``resonance train`` (several processes, no GPU) sets ``--ddp_backend
gloo`` instead of its usual ``--use_cpu``, so every accelerator it makes (the Trainer's, PPO's own) is
DistributedType.DEEPSPEED, and DeepSpeed runs its engine over gloo with its CPU accelerator, the one it picks
where no GPU is found. The test checks the log says DEEPSPEED and that the checkpoint holds each process's ZeRO
partition, written at the stage asked for.

PPO samples its rollouts, each process from its own prompts and random stream: one process cannot draw the same
responses as two, so PPO is compared with two processes under DDP (``configs/accelerate/cpu_2proc.yaml``), which
draw the same prompts and tokens with the same seed; the rewards show the responses were the same. Its minibatch
is two micro-batches (``--gradient_accumulation_steps 2``): DeepSpeed steps its optimizer inside ``backward``, and
must do so once a minibatch, as DDP does (stepping every micro-batch moved some tensor by 1.1 of its norm).

Tolerances: ``test_multiprocess``'s, for the same reason (the same sums in another order: DeepSpeed's
reduce-scatter of the half-batch gradients over gloo), and ``test_fsdp_cpu``'s exception for RM: losses 1e-5
relative, grad norms 1e-4, each LoRA tensor 1e-4 of its norm (measured under ZeRO-3: 5e-5 for SFT, 7e-5 for
DPO, 1.2e-5 for PPO; ZeRO-2 SFT: 6e-8). RM's reward head has a bias that the pairwise loss
``-log sigmoid(r_chosen - r_rejected)`` cancels: its gradient is rounding alone, which AdamW divides by its own
size into steps of up to the learning rate (one run's bias ends at 1.5e-3, the other's at 2e-4). That bias is
left out, and RM's weights, whose rewards it shifts by rounding, get 1e-3 of their norm (measured: 1.1e-4). A
real difference is far above both: a process training alone on 2 rows a step moves some tensor by 0.5 to 0.9
of its norm after 4 steps, and a LoRA initialised from another random state (what ZeRO-3 gave before LoRA was
seeded after the model loaded) by 1.4.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (this module needs DeepSpeed: without it, collection fails; see the docstring)
import pytest
import torch
from helpers import REPO
from helpers.repo import TESTS
from test_fsdp_cpu import _assert_loads, _assert_weights_match, assert_logged_alike
from test_multiprocess import (
    GLOBAL_BATCH,
    ROWS,
    STEPS,
    _alternating_rows,
    _assert_same_training,
    _run,
    assert_same_steps,
    mixed_argv,
)
from test_multiprocess import _train as train_logged
from test_sharded_resume import SAVED, assert_refused_alone, assert_resumed_equal, sharded_argv

ZERO3 = REPO / "configs" / "accelerate" / "zero3_cpu_2proc.yaml"
DDP = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
WEIGHT_TOLERANCE = {"sft": 1e-4, "dpo": 1e-4, "rm": 1e-3, "ppo": 1e-4}


def _launch(algorithm: str, argv: list[str], processes: int, launch: list[str]) -> str:
    """``resonance train`` in one process, or in ``processes`` through ``accelerate launch`` with ``launch``'s flags;
    the run's output."""
    if processes > 1:
        launch = ["-m", "accelerate.commands.launch", *launch, "--num_processes", str(processes)]
        launch += ["--main_process_port", "0"]  # 0: a free port
    return _run([sys.executable, *(launch if processes > 1 else []), "-m", "resonance", "train", algorithm, *argv])


def _train(algorithm: str, ckpt: Path, out: Path, processes: int, launch: list[str]) -> tuple[list[dict], str]:
    """Train with ``processes`` processes (``launch``: ``accelerate launch``'s flags for two); the logged steps
    (those with a loss, PPO: every step) and the run's output."""
    output = _launch(algorithm, sharded_argv(algorithm, ckpt, out, processes), processes, launch)
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry or algorithm == "ppo"], output


def _assert_zero_partitions(out: Path, stage: int) -> None:
    """The checkpoint is DeepSpeed's, ZeRO ``stage`` over two processes: each wrote its optimizer partition."""
    folder = out / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
    for rank in (0, 1):
        assert (folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file(), sorted(folder.iterdir())
    model_states = torch.load(next(folder.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    assert model_states["ds_config"]["zero_optimization"]["stage"] == stage
    assert model_states["dp_world_size"] == 2


@pytest.mark.parametrize(
    ("algorithm", "stage"), [("sft", 3), ("dpo", 3), ("rm", 3), ("sft", 2)], ids=["sft", "dpo", "rm", "sft-zero2"]
)
def test_zero_on_two_cpu_processes_matches_one(
    algorithm: str, stage: int, tiny_checkpoint, tmp_path: Path, capsys
) -> None:
    """... and SFT under ZeRO-3 resumed from the two processes' ``checkpoint-2`` (each process's ZeRO partition of
    the model and optimizer, its random states) reaches exactly what they reached (``test_sharded_resume``); one
    process meeting that checkpoint stops with a CheckpointError."""
    ckpt = tiny_checkpoint("llava")
    launch = ["--config_file", str(ZERO3), "--zero_stage", str(stage)]
    two_logs, two_output = _train(algorithm, ckpt, tmp_path / "two", 2, launch)
    one_logs, _ = _train(algorithm, ckpt, tmp_path / "one", 1, [])

    # Two processes really trained together under DeepSpeed, with ZeRO partitions, and 4 of the 16 rows a step.
    assert_same_steps(two_logs, two_output, one_logs, GLOBAL_BATCH, ROWS, "DEEPSPEED")
    _assert_zero_partitions(tmp_path / "two", stage)
    _assert_weights_match(tmp_path / "two", tmp_path / "one", WEIGHT_TOLERANCE[algorithm])
    _assert_loads(tmp_path / "two")
    if (algorithm, stage) == ("sft", 3):  # one more launch: resumed, the two-process run is the uninterrupted one
        _resume(algorithm, ckpt, tmp_path / "two", tmp_path / "resumed", launch)
        checkpoint = tmp_path / "two" / f"checkpoint-{SAVED}"  # in one process: refused (transformers went on silently)
        refusal = "its optimizer state was saved under DeepSpeed on 2 processes, and this run is under neither FSDP"
        message = f"--resume_from_checkpoint {checkpoint}: {refusal}"
        assert_refused_alone(algorithm, ckpt, checkpoint, tmp_path / "alone", capsys, message)


def _resume(algorithm: str, ckpt: Path, straight: Path, resumed: Path, launch: list[str]) -> None:
    """Resume ``straight``'s ``checkpoint-2`` in two processes into ``resumed``: exactly ``straight``'s steps and
    weights."""
    checkpoint = straight / f"checkpoint-{SAVED}"
    _launch(algorithm, sharded_argv(algorithm, ckpt, resumed, resume_from_checkpoint=checkpoint), 2, launch)
    assert_resumed_equal(straight, resumed)


def test_ppo_under_zero3_matches_ddp(tiny_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """PPO's own loop (its Accelerator prepares the model and optimizer without a dataloader) under ZeRO-3: the
    same rollouts, losses and weights as two DDP processes, and an output that loads in one process. Its
    checkpoint (every process's ZeRO partitions, through accelerate's ``save_state``) resumes exactly under ZeRO-3,
    and one process meeting it stops with a CheckpointError before it trains."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS), prepend=os.pathsep)  # --reward_funcs helpers.rewards:...
    ckpt = tiny_checkpoint("llava")
    zero_logs, zero_output = _train("ppo", ckpt, tmp_path / "zero3", 2, ["--config_file", str(ZERO3)])
    ddp_logs, ddp_output = _train("ppo", ckpt, tmp_path / "ddp", 2, ["--config_file", str(DDP)])

    assert "2 process(es), DistributedType.DEEPSPEED" in zero_output, zero_output[-4000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in ddp_output, ddp_output[-4000:]
    for logs in (zero_logs, ddp_logs):
        assert [entry["step"] for entry in logs] == list(range(1, STEPS + 1))
    for zero, ddp in zip(zero_logs, ddp_logs, strict=True):
        assert_logged_alike(zero, ddp)
    _assert_weights_match(tmp_path / "zero3", tmp_path / "ddp", WEIGHT_TOLERANCE["ppo"])
    _assert_loads(tmp_path / "zero3")

    checkpoint = tmp_path / "zero3" / f"checkpoint-{SAVED}"
    partitions = {path.name for path in (checkpoint / "sharded_state" / "pytorch_model").iterdir()}
    assert {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)} <= partitions, partitions
    _resume("ppo", ckpt, tmp_path / "zero3", tmp_path / "resumed", ["--config_file", str(ZERO3)])
    refusal = "saved under DEEPSPEED (ZeRO-3) on 2 process(es), and this run is with a whole (unsharded) optimizer"
    assert_refused_alone("ppo", ckpt, checkpoint, tmp_path / "alone", capsys, f"{checkpoint}: {refusal}")


def test_a_process_without_images_trains_with_the_other_under_zero3(tiny_checkpoint, tmp_path: Path) -> None:
    """``test_multiprocess``'s mixed-modality case under ZeRO-3: every step one process's row has an image and the
    other's has none; ZeRO-3 gathers the tower's partitioned weights from every process as it runs, so without the
    placeholder image pass the process without an image never takes part and the run hangs (a timeout fails it).
    ZeRO-3 also checks, after the first step, that every process ran its modules in the same order: a placeholder
    pass that ran after DeepSpeed's own hook on the language model, or backpropagated through more of the tower
    than the language model reads, stopped the run at step 2 ("Detected a disagreement on list length between
    rank0 and rank1: 335, 336"). It is exactly the one-process run over the same rows (``test_multiprocess``'s
    tolerances: the same sums in another order)."""
    ckpt, rows = tiny_checkpoint("qwen2_vl"), 2 * STEPS
    data = _alternating_rows(tmp_path, rows)
    launch = ("--config_file", str(ZERO3))
    two_argv = mixed_argv(ckpt, data, tmp_path / "two", 1, "fsdp")  # LoRA, the tower frozen: its weights gathered
    two = train_logged("sft", ckpt, tmp_path / "two", 2, two_argv, timeout=300, launch=launch)
    one = train_logged("sft", ckpt, tmp_path / "one", 1, mixed_argv(ckpt, data, tmp_path / "one", 2, "fsdp"))
    _assert_same_training(two, one, 2, rows, "DEEPSPEED")
    moved = max(w.abs().max().item() for n, w in one[1].items() if ".lora_B." in n)  # zero at the start
    assert moved > 1e-6, "training did not move the LoRA weights: the comparison would prove nothing"
