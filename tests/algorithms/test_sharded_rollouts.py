"""Rollouts under FSDP 2 on two CPU processes whose responses end at different lengths in the same step: GRPO (TRL's
trainer) trains exactly like two processes under DDP, and PPO completes, because generation is synchronized. GRPO's
run also has images in one process's prompts and none in the other's, every step.

Under a sharded strategy every forward pass of every process joins the others' all-gathers of the sharded weights.
A process whose responses have all ended stops calling forward while the other still generates: without
synchronized generation (``synced_gpus``) the other waits in an all-gather it never joins (a hang; over gloo,
measured: "gloo::EnforceNotMet ... Received data size doesn't match expected size", the finished process's next
collective met the other's all-gather). With it, transformers' ``generate`` keeps a finished process running
forward passes until every process has finished. Under FSDP 2 transformers turns it on by itself: torch's
``fully_shard`` marks every module it manages ``_is_fsdp_managed_module``, which ``generate`` reads
(``is_fsdp_managed_module``); PPO also passes it explicitly. Each run is killed after a time limit that fails it.

Responses that end at different lengths on the two processes, deterministically: :func:`uneven_checkpoint` is the
tiny LLaVA with one token in three an end-of-sequence token (its generation config, which TRL and PPO both read)
and its LM head scaled so the next token depends on the prompt (a random tiny model's logits are nearly uniform:
two processes drawing from the same seeded stream then sample the same positions, and PPO's two processes ended
at the same length every step). Whether they ended apart is not assumed: the runs are launched through this
module (``__main__`` below), which runs ``resonance train`` with ``GenerationMixin.generate`` observed: each call
writes where the process's longest response ended (its first end-of-sequence token) and how many forward passes it
ran. The test requires a call in which the two processes' responses ended at different lengths, and that in every
call both ran as many forward passes as the longer response took (the one that finished first kept joining:
synchronized). Measured, GRPO: one process's completions ended at 5 tokens and the other's at 6, both ran 6 passes;
in the second step 1 and 3 tokens, 3 passes.

Prompts with and without images (:func:`alternating_prompts`): the process without images runs the vision tower on a
placeholder image wherever the other runs it (``VLGRPOTrainer``: in ``generate`` and in each log-prob forward pass,
its zero term in the loss), since FSDP gathers the tower's weights from both (without it the run ends in a
collective mismatch: one process aborts, the other's FSDP all-gather reports "Connection reset by peer"); and TRL's
gather of the prompts' images for its logs, which only a process with images joins, is turned off for such a step
(without that: "Detected mismatch between collectives on ranks", an all-gather of TRL's ``gather_object`` against
one of FSDP's). The DDP run needs the second too, and no placeholder (the tower is frozen): matching it shows the
placeholder changes neither the losses nor the weights. The observation checks the first process's prompts had
images and the second's none.

GRPO is compared with two processes under DDP (``configs/accelerate/cpu_2proc.yaml``), as ``test_fsdp_cpu``
compares PPO: each process samples from its own prompts and random stream, which two DDP processes draw alike
with the same seed. Every logged value (rewards, completion lengths, loss, KL, entropy) but the step time within
1e-5 of itself plus one unit of PPO's logged rounding (``test_fsdp_cpu.assert_logged_alike``: the same completions;
losses differ only by the order of the same sums, ~1e-7 in fp32),
each LoRA tensor within 1e-4 of its norm (``test_multiprocess``'s argument; measured: 3.1e-7). PPO's run is the
uneven-length case of ``test_fsdp_cpu``'s comparison, which has fixed lengths: it must complete, and its output
load in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import EXAMPLES, REWARDS, train_argv
from helpers.repo import TESTS
from test_fsdp_cpu import CONFIG as FSDP
from test_fsdp_cpu import LAYERS, _assert_loads, _assert_weights_match, assert_logged_alike
from test_multiprocess import CONFIG as DDP
from test_multiprocess import _run

RECORD = "RESONANCE_TEST_GENERATIONS"  # the folder where the observed runs write their generation lengths
STEPS = 2  # the second step samples from what the first trained
TIMEOUT = 300  # s; a run takes 20 to 60 s here
MAX_NEW_TOKENS = 8


def uneven_checkpoint(ckpt: Path, folder: Path) -> Path:
    """A copy of the tiny checkpoint ``ckpt`` whose responses end at lengths that differ from prompt to prompt: one
    token in three ends a response (the generation config's ``eos_token_id``), and its LM head is 10 times larger
    (logits of standard deviation ~1.6 instead of ~0.16: the prompt decides the token)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = folder / "uneven"
    shutil.copytree(ckpt, out)
    vocab = json.loads((out / "config.json").read_text())["text_config"]["vocab_size"]
    generation = json.loads((out / "generation_config.json").read_text())
    # token 1 the tokenizer's own; 0, 2, 3 and 4 (BOS, pad, unknown, the image placeholder) left alone
    generation["eos_token_id"] = [1, *range(5, vocab, 3)]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    weights = load_file(out / "model.safetensors")
    (head,) = [name for name in weights if name.endswith("lm_head.weight")]
    weights[head] = weights[head] * 10
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(load_file(out / "model.safetensors")[head], weights[head])
    return out


def alternating_prompts(folder: Path, count: int = 2 * STEPS) -> Path:
    """``count`` GRPO prompt rows, one with an image then one without: taken in order (``--shuffle_dataset false``),
    each step's first prompt goes to the first process and the second to the second."""
    image = str(EXAMPLES / "images" / "red_square.png")
    rows = [
        {"prompt": f"<image>Describe {i}.", "image": image} if i % 2 == 0 else {"prompt": f"Say {i}."}
        for i in range(count)
    ]
    path = folder / "alternating.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def argv(algorithm: str, ckpt: Path, data: Path, out: Path) -> list[str]:
    """Two steps of GRPO or PPO on ``data``, rewarded by ``token_sum_reward``, saved at the end."""
    online: dict[str, Any] = {
        # 2 completions (of one prompt) a process and step, the prompts in the data's order, and a KL term (beta):
        # the reference's forward passes (the adapter disabled) run with or without images too
        "grpo": {
            "per_device_train_batch_size": 2,
            "max_completion_length": MAX_NEW_TOKENS,
            "shuffle_dataset": False,
            "beta": 0.04,
        },
        # test_deepspeed_cpu's PPO (runs under ZeRO-3 too): one optimizer step a minibatch of two micro-batches,
        # each generated in its own call (generation_batch_size; by default a step's rows are one call, whose 4
        # responses end at about the same longest length on both processes: no uneven call to test)
        "ppo": {
            "response_length": MAX_NEW_TOKENS,
            "num_mini_batches": 1,
            "gradient_accumulation_steps": 2,
            "generation_batch_size": 2,
        },
    }
    return train_argv(
        algorithm, ckpt, data, out, reward_funcs=f"{REWARDS}:token_sum_reward",
        max_steps=STEPS, learning_rate="1e-3", lora_dropout=0, save_strategy="steps", save_steps=STEPS,
        **online[algorithm],
    )  # fmt: skip


def launch(algorithm: str, argv: list[str], config: Path, observed: bool = False) -> str:
    """``resonance train ALGORITHM`` in two processes through ``accelerate launch --config_file config`` (FSDP: the
    tiny LLaVA's layers named); ``observed``: through this module's ``__main__``, lengths written to the folder
    :func:`record` names."""
    flags = ["--config_file", str(config), "--num_processes", "2", "--main_process_port", "0"]  # 0: a free port
    if config == FSDP:
        flags += ["--fsdp_transformer_layer_cls_to_wrap", LAYERS]
    program = [__file__] if observed else ["-m", "resonance"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, *program]
    return _run([*command, "train", algorithm, *argv], timeout=TIMEOUT)


def logs(out: Path) -> list[dict]:
    """The run's logged steps (from the final checkpoint's trainer state)."""
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry or "policy_loss" in entry]


def assert_ended_apart(record: Path) -> None:
    """In some call of the observed run the two processes' responses ended at different lengths, and in every call
    both ran as many forward passes (a token each, the longer's: the one that finished first kept joining)."""
    calls = [[json.loads(line) for line in (record / f"rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)]
    assert len(calls[0]) == len(calls[1]) >= STEPS, calls
    for first, second in zip(*calls, strict=True):
        assert first["forwards"] == second["forwards"] == max(first["ended"], second["ended"]), calls
    assert any(first["ended"] != second["ended"] for first, second in zip(*calls, strict=True)), (
        f"the processes' responses ended at the same lengths in every call: the test proves nothing ({calls})"
    )


def assert_images_on_one(record: Path) -> None:
    """In every call of the observed run the first process's prompts held images and the second's none."""
    calls = [
        [json.loads(line)["images"] for line in (record / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    ]
    assert all(calls[0]) and not any(calls[1]), calls


def assert_same_logs(sharded: list[dict], ddp: list[dict], ignore: frozenset[str] = frozenset()) -> None:
    """Every logged value of each step but ``ignore`` alike (tolerances: the module docstring)."""
    assert [entry["step"] for entry in sharded] == [entry["step"] for entry in ddp] == list(range(1, STEPS + 1))
    for sharded_entry, ddp_entry in zip(sharded, ddp, strict=True):
        assert sharded_entry.keys() == ddp_entry.keys()
        assert_logged_alike(*({k: v for k, v in e.items() if k not in ignore} for e in (sharded_entry, ddp_entry)))


def observe_into(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``folder`` made, for the observed runs to write their generation lengths to; tests/ on the runs' PYTHONPATH
    (``--reward_funcs helpers.rewards:...`` imports there)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    folder.mkdir()
    monkeypatch.setenv(RECORD, str(folder))  # the runs get this process's environment (_run)
    return folder


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """:func:`observe_into` a folder of the test's."""
    return observe_into(tmp_path / "record", monkeypatch)


def test_grpo_under_fsdp_with_uneven_lengths_matches_ddp(tiny_checkpoint, tmp_path: Path, record: Path) -> None:
    ckpt, data = uneven_checkpoint(tiny_checkpoint("llava"), tmp_path), alternating_prompts(tmp_path)
    output = launch("grpo", argv("grpo", ckpt, data, tmp_path / "fsdp"), FSDP, observed=True)
    ddp_output = launch("grpo", argv("grpo", ckpt, data, tmp_path / "ddp"), DDP)
    assert "2 process(es), DistributedType.FSDP" in output, output[-4000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in ddp_output, ddp_output[-4000:]
    assert_ended_apart(record)
    assert_images_on_one(record)
    assert_same_logs(logs(tmp_path / "fsdp"), logs(tmp_path / "ddp"), ignore=frozenset({"step_time"}))
    _assert_weights_match(tmp_path / "fsdp", tmp_path / "ddp", 1e-4)
    _assert_loads(tmp_path / "fsdp")


def test_ppo_under_fsdp_with_uneven_lengths_completes(tiny_checkpoint, tmp_path: Path, record: Path) -> None:
    ckpt = uneven_checkpoint(tiny_checkpoint("llava"), tmp_path)
    output = launch("ppo", argv("ppo", ckpt, EXAMPLES / "dpo.jsonl", tmp_path / "fsdp"), FSDP, observed=True)
    assert "2 process(es), DistributedType.FSDP" in output, output[-4000:]
    assert_ended_apart(record)
    assert [entry["step"] for entry in logs(tmp_path / "fsdp")] == list(range(1, STEPS + 1))
    _assert_loads(tmp_path / "fsdp")


def _observe_generation(folder: Path) -> None:
    """Make every ``generate`` call of this process write, to ``folder/rank{RANK}.jsonl``, where its longest
    response ended (its first end-of-sequence token, of the model's generation config; else the last token), how
    many forward passes it ran, and whether its prompts held images. Observation only: the call and its result are
    unchanged."""
    import torch
    from transformers.generation.utils import GenerationMixin

    generate = GenerationMixin.generate

    def observed(self, *args: Any, **kwargs: Any) -> Any:
        forwards = []
        hook = self.register_forward_hook(lambda *_: forwards.append(1))
        try:
            sequences = generate(self, *args, **kwargs)
        finally:
            hook.remove()
        new = sequences[:, kwargs["input_ids"].shape[1] :]  # both trainers pass the prompt ids by name
        ends = torch.isin(new, torch.tensor(self.generation_config.eos_token_id))
        ended = torch.where(ends.any(dim=1), ends.int().argmax(dim=1) + 1, new.shape[1])
        images = kwargs.get("pixel_values") is not None
        line = json.dumps({"ended": int(ended.max()), "forwards": len(forwards), "images": images})
        with (folder / f"rank{os.environ['RANK']}.jsonl").open("a") as file:
            file.write(line + "\n")
        return sequences

    GenerationMixin.generate = observed


if __name__ == "__main__":  # launched by launch(observed=True): resonance's command line, generation observed
    from resonance.cli import entry

    _observe_generation(Path(os.environ[RECORD]))
    entry()
