"""Rollouts under DeepSpeed ZeRO-3 on two CPU processes whose responses end at different lengths in the same step:
GRPO (TRL's trainer) trains exactly like two processes under DDP, with its weights gathered for generation (TRL's
default, ``ds3_gather_for_generation``) and without (each forward pass gathers them, as under FSDP), with images in
one process's prompts and none in the other's, and PPO (which generates without gathering) completes.

This module runs only where DeepSpeed is installed (the ``deepspeed`` extra; CI installs it): it imports
``deepspeed``, so a suite without it fails here at collection instead of passing without these tests.

As ``test_sharded_rollouts`` (its checkpoint, runs, observation and tolerances), launched with the shipped
``configs/accelerate/zero3_cpu_2proc.yaml``. Under ZeRO-3 transformers synchronizes generation by itself
(``synced_gpus`` follows ``is_deepspeed_zero3_enabled``). Where TRL gathers the weights for generation no
collective runs inside it; where it does not, a finished process must keep joining the others' gathers, which the
observation shows it did. The process without images runs the tower on a placeholder image (as under FSDP, see
``test_sharded_rollouts``), in the order the other runs it on its images: ZeRO-3 checks that every process fetched
the same modules in the same order ("Detected a disagreement on list contents between rank0 and rank1" when the
placeholder's hook ran after DeepSpeed's own), and, with TRL's gradient checkpointing, that their backward passes
fetch alike ("Detected mismatch between collectives" when the placeholder's zero term also reached the tower's last
layer, which LLaVA does not read). The GRPO runs share one DDP run (``ddp_grpo``). Measured: each LoRA tensor within
7.9e-7 of its norm of the DDP run's (gathered or not; tolerance 1e-4, the module docstring of ``test_multiprocess``:
DeepSpeed's reduce-scatter adds the same gradients in another order).
"""

from __future__ import annotations

import os
from pathlib import Path

import deepspeed  # noqa: F401  (this module needs DeepSpeed: without it, collection fails; see the docstring)
import pytest
from helpers import EXAMPLES, REPO
from helpers.repo import TESTS
from test_fsdp_cpu import _assert_loads, _assert_weights_match
from test_multiprocess import CONFIG as DDP
from test_sharded_rollouts import (
    STEPS,
    alternating_prompts,
    argv,
    assert_ended_apart,
    assert_images_on_one,
    assert_same_logs,
    launch,
    logs,
    observe_into,
    uneven_checkpoint,
)

ZERO3 = REPO / "configs" / "accelerate" / "zero3_cpu_2proc.yaml"
PROMPTS = EXAMPLES / "dpo.jsonl"  # PPO's, every one with an image


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """:func:`observe_into` a folder of the test's."""
    return observe_into(tmp_path / "record", monkeypatch)


@pytest.fixture(scope="module")
def uneven(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`uneven_checkpoint`, built once for the module."""
    return uneven_checkpoint(tiny_checkpoint("llava"), tmp_path_factory.mktemp("uneven"))


@pytest.fixture(scope="module")
def ddp_grpo(uneven: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of GRPO in two DDP processes: the runs under ZeRO-3 are compared with it."""
    folder = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(TESTS), prepend=os.pathsep)  # --reward_funcs helpers.rewards:...
        output = launch("grpo", argv("grpo", uneven, alternating_prompts(folder), folder / "out"), DDP)
    assert "2 process(es), DistributedType.MULTI_CPU" in output, output[-4000:]
    return folder / "out"


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "partitioned"])
def test_grpo_under_zero3_with_uneven_lengths_matches_ddp(
    gathered: bool, uneven: Path, ddp_grpo: Path, tmp_path: Path, record: Path
) -> None:
    out = tmp_path / "zero3"
    flags = [*argv("grpo", uneven, alternating_prompts(tmp_path), out), "--ds3_gather_for_generation", str(gathered)]
    output = launch("grpo", flags, ZERO3, observed=True)
    assert "2 process(es), DistributedType.DEEPSPEED" in output, output[-4000:]
    assert_ended_apart(record)
    assert_images_on_one(record)
    assert_same_logs(logs(out), logs(ddp_grpo), ignore=frozenset({"step_time"}))
    _assert_weights_match(out, ddp_grpo, 1e-4)
    _assert_loads(out)


def test_ppo_under_zero3_with_uneven_lengths_completes(uneven: Path, tmp_path: Path, record: Path) -> None:
    output = launch("ppo", argv("ppo", uneven, PROMPTS, tmp_path / "zero3"), ZERO3, observed=True)
    assert "2 process(es), DistributedType.DEEPSPEED" in output, output[-4000:]
    assert_ended_apart(record)
    assert [entry["step"] for entry in logs(tmp_path / "zero3")] == list(range(1, STEPS + 1))
    _assert_loads(tmp_path / "zero3")
