"""``resonance generate`` started by ``accelerate launch`` on two CPU processes writes exactly what one process
writes: under data parallel (every process holds the whole model, the rows dealt out between them), FSDP 2 and
DeepSpeed ZeRO-3 (the weights sharded, every forward pass collective).

The rows are chosen so that each way sharded generation can hang or mix up collectives happens at least once
(rows are dealt in turn, row ``i`` to process ``i % 2``, one row a batch):

* round 1: the first process's answer ends after a token or two, the second's runs to ``max_new_tokens``. Many
  token ids count as end of sequence (``--eos_token_id``), so the random tiny model ends some answers early;
  the test checks the lengths differ. The first process must keep joining the second's forward passes
  (``synced_gpus``); without it, it leaves generation while the other waits for it.
* round 2: a prompt without an image beside one with an image. The first process still runs the image encoder on
  a placeholder, where the other's ``generate`` encodes its image, before the first forward pass.
* round 3: one row for two processes: the second generates a copy of a row, whose answer is dropped, so that both
  run the same forward passes.

Greedy decoding in float32, one row a batch in both runs: the same arithmetic on the same (gathered) weights, so
the answers are compared for equality. A sharded run that reached other weights, or dropped, repeated or reordered
a row, writes something else.

This module imports ``deepspeed`` (the ``deepspeed`` extra, which CI installs), as ``test_deepspeed_cpu`` does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (the ZeRO-3 case needs DeepSpeed: without it, collection fails)
import pytest
from helpers import EXAMPLES, REPO
from helpers.cli import generate_argv
from test_multiprocess import _run

CONFIGS = {
    "data parallel": ("cpu_2proc.yaml", "MULTI_CPU, weights whole on each"),
    "fsdp": ("fsdp_cpu_2proc.yaml", "FSDP, weights sharded"),
    "zero3": ("zero3_cpu_2proc.yaml", "DEEPSPEED, weights sharded"),
}
IMAGES = EXAMPLES / "images"
ROWS = [
    {"images": [str(IMAGES / "red_square.png"), str(IMAGES / "green_triangle.png")],
     "prompt": "Image 1: <image>\nImage 2: <image>\nWhich image shows a red shape?"},
    {"images": [str(IMAGES / "blue_circle.png"), str(IMAGES / "yellow_bar.png")],
     "prompt": "Which of the two images shows a circle?"},
    {"prompt": "What colour do you get by mixing blue and yellow?"},
    {"image": str(IMAGES / "red_square.png"), "prompt": "<image>\nHow many sides does the shape have?"},
    {"image": str(IMAGES / "red_square.png"), "prompt": "<image>\nWhat colour is the shape?"},
]  # fmt: skip
MAX_NEW_TOKENS = 8
EOS = json.dumps(list(range(5, 400, 2))).replace(" ", "")  # half the tiny vocabulary ends an answer


def _generate(ckpt: Path, data: Path, out: Path, config: str | None) -> tuple[list[dict], str]:
    """The answers and the log of ``resonance generate`` in one process, or two launched with ``config``."""
    argv = generate_argv(
        ckpt, data, out, batch_size=1, max_new_tokens=MAX_NEW_TOKENS, do_sample="false", eos_token_id=EOS
    )
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / config),
              "--num_processes", "2", "--main_process_port", "0"] if config else []  # fmt: skip
    log = _run([sys.executable, *launch, "-m", "resonance", "generate", *argv], timeout=300)
    return [json.loads(line) for line in out.read_text().splitlines()], log


@pytest.fixture(scope="module")
def one_process(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """The tiny LLaVA, the rows, and what one process writes for them (checked to hold the cases above)."""
    folder = tmp_path_factory.mktemp("generate")
    data = folder / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    ckpt = tiny_checkpoint("llava")
    answers, _ = _generate(ckpt, data, folder / "one.jsonl", None)
    assert [a["source"] for a in answers] == [f"{data}:{i}" for i in range(1, len(ROWS) + 1)]
    short, long = (len(a["answer"]) for a in answers[:2])
    assert 0 < short < long, f"round 1 must end the first process's answer well before the second's: {answers[:2]}"
    return ckpt, data, answers


@pytest.mark.parametrize("strategy", list(CONFIGS))
def test_two_processes_write_what_one_writes(strategy: str, one_process, tmp_path: Path) -> None:
    ckpt, data, expected = one_process
    config, described = CONFIGS[strategy]
    answers, log = _generate(ckpt, data, tmp_path / "two.jsonl", config)
    assert f"generating on 2 processes (DistributedType.{described})" in log
    assert answers == expected
    assert not list(tmp_path.glob(".two.jsonl.*")), "a temporary file was left behind"
