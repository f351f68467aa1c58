"""Two CPU processes (gloo) train exactly like one process with the same global batch: SFT and DPO, and SFT where
every step one process's row has an image and the other's has none (which hung before), under DDP and FSDP 2.

Both runs train the tiny LLaVA for one epoch of the example data (16 rows, 4 steps of 4 rows): two processes
with 2 rows each, and one process with 4. Their logged losses and final LoRA weights must agree to fp32
rounding.

Launching: the shipped ``configs/accelerate/cpu_2proc.yaml``, as README tells users to. It says
``distributed_type: MULTI_GPU`` so that accelerate starts the processes through torchrun (with ``MULTI_CPU`` it
starts ONE process unless ``mpirun`` is set up, which then trains alone with the per-process batch);
``resonance train`` sees ``WORLD_SIZE`` > 1 without a GPU and sets ``--use_cpu``, so accelerate joins them into
one gloo group (MULTI_CPU), which the test checks in the log.

Tolerances: the two runs add the same numbers in another order (gloo's all-reduce of two half-batch
gradients, per-process padding), about 1e-7 of each value in fp32. Losses are forward passes: 1e-5 relative.
Weights pass through AdamW, whose m / (sqrt(v) + eps) enlarges that rounding in entries whose gradients are
near zero: the worst tensor measured differs by 9e-6 of its norm, so each LoRA tensor must be within 1e-4 of
its norm. A real difference in the data or its weighting is far above either: a process training alone on 2
rows a step, LoRA dropout 0.05, or ``--average_tokens_across_devices False`` each move some tensor by 0.5 to
0.9 of its norm after 4 steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from helpers import EXAMPLES, REPO, train_argv
from safetensors.torch import load_file

CONFIG = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
STEPS, GLOBAL_BATCH, ROWS = 4, 4, 16


def _argv(algorithm: str, ckpt: Path, out: Path, per_device: int) -> list[str]:
    return train_argv(
        algorithm, ckpt, EXAMPLES / f"{algorithm}.jsonl", out,
        max_steps=STEPS, per_device_train_batch_size=per_device,
        # a rate that moves the weights well away from where they start (DPO's default 1e-6 barely does)
        learning_rate="1e-3",
        # LoRA dropout draws its masks from each process's own random stream: no two-process run can match
        lora_dropout=0,
        save_strategy="steps", save_steps=STEPS,
    )  # fmt: skip


def _run(command: list[str], timeout: int = 600) -> str:
    # a clean environment: nothing from an outer launcher (ranks, ports) reaches the runs
    outer = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {key: value for key, value in os.environ.items() if key not in outer}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    # a session of its own: a run that hangs is killed with every process it started; torchrun starts each worker in
    # a session of its own too, so they are found as its descendants, before the kill orphans them
    with subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, **pipes) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            descendants = psutil.Process(process.pid).children(recursive=True)
            os.killpg(process.pid, signal.SIGKILL)
            for child in descendants:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(command)}: still running after {timeout} s, killed (a hang):\n{stderr[-4000:]}")
    output = stdout + stderr
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def _train(
    algorithm: str,
    ckpt: Path,
    out: Path,
    processes: int,
    argv: list[str] | None = None,
    timeout: int = 600,
    launch: tuple[str, ...] = ("--config_file", str(CONFIG)),
) -> tuple[list[dict], dict[str, torch.Tensor], str]:
    """Train with ``processes`` processes (``argv``: :func:`_argv`'s by default; ``launch``: the flags of
    ``accelerate launch`` for several); the logged losses, the saved weights (the adapter, or the model for full
    training) and the run's output."""
    argv = argv or _argv(algorithm, ckpt, out, GLOBAL_BATCH // processes)
    if processes == 1:
        command = [sys.executable, "-m", "resonance", "train", algorithm, *argv]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", *launch,
            "--num_processes", str(processes), "--main_process_port", "0",  # 0: a free port
            "-m", "resonance", "train", algorithm, *argv,
        ]  # fmt: skip
    output = _run(command, timeout)
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    weights = out / "adapter_model.safetensors"
    return logs, load_file(weights if weights.is_file() else out / "model.safetensors"), output


def assert_same_steps(
    two_logs: list[dict], two_output: str, one_logs: list[dict], global_batch: int, rows: int, kind: str
) -> None:
    """The two-process run's logged steps are the one-process run's: it ran as ``kind`` (an accelerate
    DistributedType), over the same rows a step, to the same losses and gradient norms (tolerances: the module
    docstring)."""
    # Two processes really trained together: one group, and the global batch's rows a step (a process that trained
    # alone with its half would log half the epoch at step 1).
    assert f"2 process(es), DistributedType.{kind}" in two_output, two_output[-4000:]
    for logs in (two_logs, one_logs):
        assert [entry["step"] for entry in logs] == list(range(1, STEPS + 1))
        assert logs[0]["epoch"] == pytest.approx(global_batch / rows)
    # Logged loss: with two processes, the mean of the two processes' losses (SFT: each already divided by
    # the token count of the whole global batch, average_tokens_across_devices): the one-process loss.
    for two_entry, one_entry in zip(two_logs, one_logs, strict=True):
        assert two_entry["loss"] == pytest.approx(one_entry["loss"], rel=1e-5), f"step {one_entry['step']}"
        assert two_entry["grad_norm"] == pytest.approx(one_entry["grad_norm"], rel=1e-4), f"step {one_entry['step']}"


def _assert_same_training(two: tuple, one: tuple, global_batch: int, rows: int, kind: str = "MULTI_CPU") -> None:
    """Two processes trained exactly as one with the same global batch: the same steps over the same rows, the same
    losses and gradient norms, the same final weights (tolerances: the module docstring). ``kind``: the
    accelerate DistributedType the two processes must have run as."""
    (two_logs, two_weights, two_output), (one_logs, one_weights, _) = two, one
    assert_same_steps(two_logs, two_output, one_logs, global_batch, rows, kind)
    assert two_weights.keys() == one_weights.keys() and two_weights
    for name, one_weight in one_weights.items():
        error = ((two_weights[name] - one_weight).norm() / one_weight.norm()).item()
        assert error < 1e-4, f"{name}: the two runs differ by {error:.2e} of its norm"


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_two_cpu_processes_match_one(algorithm: str, tiny_checkpoint, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint("llava")
    two = _train(algorithm, ckpt, tmp_path / "two", processes=2)
    one = _train(algorithm, ckpt, tmp_path / "one", processes=1)
    _assert_same_training(two, one, GLOBAL_BATCH, ROWS)
    moved = max(w.abs().max().item() for name, w in one[1].items() if ".lora_B." in name)  # zero at the start
    assert moved > 1e-4, "training did not move the LoRA weights: the comparison would prove nothing"


def _alternating_rows(folder: Path, count: int) -> Path:
    """``count`` SFT rows, one with an image then one without, in that order."""
    rows = []
    for i in range(count):
        answer = {"role": "assistant", "content": f"Answer {i}."}
        if i % 2 == 0:
            question = {"role": "user", "content": "<image>What is drawn here?"}
            rows.append({"messages": [question, answer], "images": [str(EXAMPLES / "images" / "red_square.png")]})
        else:
            rows.append({"messages": [{"role": "user", "content": f"Say {i}."}, answer]})
    path = folder / "alternating.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# How the mixed-modality test trains: DDP with and without find_unused_parameters, full training of the tower (its
# weights' gradients are what DDP waits for); FSDP 2 with LoRA and the tower frozen (its sharded weights are what
# FSDP gathers, in the forward and in the backward pass).
FULL = {"lora_target_modules": "none", "freeze_vision_tower": False}
MIXED = {
    "ddp": {**FULL, "ddp_find_unused_parameters": False},
    "ddp, find_unused": {**FULL, "ddp_find_unused_parameters": True},
    "fsdp": {},
}
FSDP_LAUNCH = (
    "--config_file", str(REPO / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml"),
    "--fsdp_transformer_layer_cls_to_wrap", "Qwen2VLDecoderLayer,Qwen2VLVisionBlock",
)  # fmt: skip


def mixed_argv(ckpt: Path, data: Path, out: Path, per_device: int, setting: str) -> list[str]:
    """The mixed-modality run's ``resonance train sft`` flags (``setting``: a key of :data:`MIXED`)."""
    return train_argv(
        "sft", ckpt, data, out,
        max_steps=STEPS, per_device_train_batch_size=per_device, learning_rate="1e-3", lora_dropout=0,
        train_sampling_strategy="sequential", save_strategy="steps", save_steps=STEPS,
        # plain SGD: AdamW turns the rounding noise of gradients that are zero in exact arithmetic (a key
        # projection's bias) into whole steps of the learning rate; SGD's steps are the gradients themselves
        optim="sgd", **MIXED[setting],
    )  # fmt: skip


@pytest.mark.parametrize("setting", list(MIXED))
def test_a_process_without_images_trains_with_the_others(setting: str, tiny_checkpoint, tmp_path: Path) -> None:
    """Two processes, and every step one process's row has an image and the other's has none (rows in order, one
    each). DDP without ``find_unused_parameters`` (the Trainer's choice under gradient checkpointing) needs every
    trained weight's gradient from every process; FSDP gathers the tower's weights from every process, as it runs
    and again in the backward pass: without the placeholder image pass the process without an image never takes
    part, and the run hangs (a timeout fails it). DDP with ``find_unused_parameters`` (the Trainer's choice
    otherwise) finds the unused weights itself and must get no pass (it would count the pass's gradients twice, and
    stop). Each way the run is exactly the one-process run over the same rows."""
    # Qwen2-VL: every weight of its tower reaches the features (LLaVA's post_layernorm does not, since it reads the
    # second-to-last layer: without find_unused_parameters its full training fails under DDP with or without images)
    ckpt, rows = tiny_checkpoint("qwen2_vl"), 2 * STEPS
    data = _alternating_rows(tmp_path, rows)
    fsdp = setting == "fsdp"
    launch = FSDP_LAUNCH if fsdp else ("--config_file", str(CONFIG))
    two_argv = mixed_argv(ckpt, data, tmp_path / "two", 1, setting)
    two = _train("sft", ckpt, tmp_path / "two", 2, two_argv, timeout=300, launch=launch)
    one = _train("sft", ckpt, tmp_path / "one", 1, mixed_argv(ckpt, data, tmp_path / "one", 2, setting))
    _assert_same_training(two, one, 2, rows, "FSDP" if fsdp else "MULTI_CPU")
    if fsdp:  # LoRA: its B matrices start at zero
        moved = max(w.abs().max().item() for n, w in one[1].items() if ".lora_B." in n)
    else:
        start = load_file(ckpt / "model.safetensors")
        moved = max((one[1][n] - start[n]).abs().max().item() for n in one[1] if n.startswith("visual."))
    assert moved > 1e-6, "training did not move the weights compared: the comparison would prove nothing"


def _whiten_worker(rank: int, init: str, results: dict) -> None:
    import torch.distributed as dist

    from resonance.algorithms.ppo.rollout import whiten_across

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        values, masks = _whiten_data()
        mine = slice(0, 2) if rank == 0 else slice(2, 3)  # unequal shares: 2 micro-batches and 1

        def reduce(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            dist.all_reduce(t)
            return t

        for shift_mean in (True, False):
            out = whiten_across(values[mine], masks[mine], shift_mean, reduce=reduce)
            results[(rank, shift_mean)] = [t.clone() for t in out]
    finally:
        dist.destroy_process_group()


def _whiten_data() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 5), (3, 7), (2, 4)]  # micro-batches with responses of different lengths
    values = [torch.randn(shape, generator=generator) * 3 + 1 for shape in shapes]
    masks = [torch.rand(shape, generator=generator) > 0.3 for shape in shapes]
    return values, masks


def test_ppo_whitening_spans_all_processes(tmp_path: Path) -> None:
    """Two gloo processes, each whitening its share of a rollout with the cross-process reduce PPO uses,
    get exactly what one process whitening the whole rollout gets (not each share's own statistics)."""
    import torch.multiprocessing as mp

    from resonance.algorithms.ppo.rollout import whiten_across

    manager = mp.Manager()
    results = manager.dict()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_whiten_worker, args=(init, results), nprocs=2, start_method="spawn")
    values, masks = _whiten_data()
    for shift_mean in (True, False):
        whole = whiten_across(values, masks, shift_mean)
        shared = [*results[(0, shift_mean)], *results[(1, shift_mean)]]
        for got, want in zip(shared, whole, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        alone = whiten_across(values[2:], masks[2:], shift_mean)  # the last share on its own statistics
        assert not torch.allclose(alone[0], whole[2], atol=1e-3)
