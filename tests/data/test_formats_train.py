"""Every dataset format end to end through the command line on tiny LLaVA: each fixture of ``helpers.formats``
trains one step (SFT files with ``train sft``; preference files with ``train dpo``, format detected, and ``train
rm``, format named with ``--data_format``) with no field reported unused, prompt files feed ``resonance
generate``, parquet and ``save_to_disk`` copies of a fixture train as the JSON does; a video row is refused by row
(exit 2) or skipped and counted; an ms-swift ``"loss": false`` turn trains and leaves no labels.

Each run is ``resonance.cli.main([...])`` in this process, as a user's command line would be, on the three rows every
fixture holds (a two-image turn after a system message, a multi-turn conversation, a text-only row) in one batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
from helpers import IGNORE_INDEX, generate_argv, make_image, save_png, train_argv, write_jsonl
from helpers.formats import FIXTURES

from resonance.base.registry import load_core_mapper
from resonance.cli import main
from resonance.data.rows import load_rows
from resonance.errors import EXIT_INPUT, EXIT_OK

FAMILY = "llava"
# One step over all three rows of a fixture: every row shape reaches the collator and the model.
QUICK = {"per_device_train_batch_size": 3}
# What the loader logs (logger resonance.data) about fields it did not use and rows it skipped.
UNUSED = "fields not used"
SKIPPED = "skipp"


def _images(folder: Path) -> list[str]:
    return [save_png(folder, f"img{i}.png", make_image(40 + 8 * i, 30, seed=i)) for i in range(2)]


def _train(algorithm: str, ckpt: Path, data: Path | str, folder: Path, **flags: object) -> int:
    """``resonance train ALGORITHM`` on ``data``, output under ``folder``; the exit code."""
    return main(["train", algorithm, *train_argv(algorithm, ckpt, data, folder / "out", **{**QUICK, **flags})])


def _trained(folder: Path) -> bool:
    return (folder / "out" / "adapter_model.safetensors").is_file()


def _fixture_runs() -> list[tuple[str, str]]:
    """(fixture, algorithm): SFT fixtures with sft, preference fixtures with dpo and rm."""
    algorithms = {"sft": ("sft",), "preference": ("dpo", "rm"), "prompt": ()}
    return [(name, algorithm) for name, fixture in FIXTURES.items() for algorithm in algorithms[fixture.kind]]


@pytest.mark.parametrize(("name", "algorithm"), _fixture_runs())
def test_each_format_trains(
    name: str, algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    fixture = FIXTURES[name]
    data = fixture.write(tmp_path, _images(tmp_path))
    named = {"data_format": fixture.format} if algorithm == "rm" else {}  # dpo and sft: detected
    with caplog.at_level(logging.WARNING, logger="resonance.data"):
        code = _train(algorithm, tiny_checkpoint(FAMILY), data, tmp_path, **named)
    assert code == EXIT_OK
    assert _trained(tmp_path)
    assert UNUSED not in caplog.text  # every field of a documented row is read
    assert SKIPPED not in caplog.text


def test_a_field_no_format_reads_is_reported(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The other side of the check above: the same fixture with an extra field trains and names it, once."""
    data = FIXTURES["sharegpt"].write(tmp_path, _images(tmp_path))
    data.write_text(json.dumps([{**row, "meta": i} for i, row in enumerate(json.loads(data.read_text()))]))
    with caplog.at_level(logging.WARNING, logger="resonance.data"):
        assert _train("sft", tiny_checkpoint(FAMILY), data, tmp_path) == EXIT_OK
    assert caplog.text.count(UNUSED) == 1
    assert "'meta' (3 rows)" in caplog.text


PROMPT_FILES = ["trl_prompt", "sharegpt_preference", "messages"]  # a prompt-only file; answers dropped or unused


@pytest.mark.parametrize("name", PROMPT_FILES)
def test_prompt_files_feed_generate(name: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    data = FIXTURES[name].write(tmp_path, _images(tmp_path))
    output = tmp_path / "answers.jsonl"
    argv = generate_argv(tiny_checkpoint(FAMILY), data, output, max_new_tokens=2, batch_size=3)
    assert main(["generate", *argv]) == EXIT_OK
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(answers) == 3


@pytest.mark.parametrize(("algorithm", "name"), [("grpo", "swift_query"), ("ppo", "alpaca_preference")])
def test_other_tools_prompt_files_feed_online_training(
    algorithm: str, name: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """GRPO and PPO read prompts through the same loader: an ms-swift and an alpaca file train one step."""
    data = FIXTURES[name].write(tmp_path, _images(tmp_path))
    flags = {"reward_funcs": "helpers.rewards:constant_reward", "per_device_train_batch_size": 2}
    assert _train(algorithm, tiny_checkpoint(FAMILY), data, tmp_path, **flags) == EXIT_OK
    assert _trained(tmp_path)


def _as_dataset(data: Path) -> datasets.Dataset:
    """A JSON list fixture as a ``datasets.Dataset`` (a text-only row's missing ``images`` becomes null)."""
    return datasets.Dataset.from_list(json.loads(data.read_text()))


@pytest.mark.parametrize(
    ("container", "name", "algorithm"), [("parquet", "sharegpt", "sft"), ("save_to_disk", "sharegpt_preference", "dpo")]
)
def test_parquet_and_save_to_disk_train(
    container: str, name: str, algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """The same rows through ``datasets``: a parquet file next to the images (relative paths, as in the JSON) and a
    ``save_to_disk`` folder (absolute paths)."""
    data = FIXTURES[name].write(tmp_path, _images(tmp_path))
    dataset = _as_dataset(data)
    if container == "parquet":
        target = tmp_path / f"{name}.parquet"
        dataset.to_parquet(str(target))
    else:
        dataset = dataset.map(lambda row: {"images": [str(tmp_path / p) for p in row["images"] or []]})
        target = tmp_path / f"{name}_dataset"
        dataset.save_to_disk(str(target))
    assert _train(algorithm, tiny_checkpoint(FAMILY), target, tmp_path) == EXIT_OK
    assert _trained(tmp_path)


def _video_file(folder: Path) -> Path:
    """Two sharegpt rows and, last, LLaMA-Factory's ``mllm_video_demo.json`` row shape: ``messages`` with a
    ``<video>`` placeholder and ``videos``."""
    image = save_png(folder, "cat.png", make_image(40, 30, seed=1))
    (folder / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")  # never opened: the row is refused first
    turns = [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A cat."}]
    video = {
        "messages": [
            {"role": "user", "content": "<video>Why is this video funny?"},
            {"role": "assistant", "content": "Because a baby is reading glasses."},
        ],
        "videos": ["clip.mp4"],
    }
    return write_jsonl(folder / "video.jsonl", [{"conversations": turns, "images": [image]}] * 2 + [video])


def test_video_row_is_refused_by_row(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = _video_file(tmp_path)
    assert _train("sft", tiny_checkpoint(FAMILY), data, tmp_path) == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"{data}:3" in err and "video" in err
    assert f"{data}:1" not in err and f"{data}:2" not in err
    assert not _trained(tmp_path)


def test_video_row_is_skipped_and_counted(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    data = _video_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="resonance.data"):
        code = _train("sft", tiny_checkpoint(FAMILY), data, tmp_path, skip_invalid_rows=True)
    assert code == EXIT_OK
    assert _trained(tmp_path)
    assert f"{data}:3" in caplog.text and "video" in caplog.text
    assert f"{SKIPPED}ed 1 invalid of 3 rows in {data}" in caplog.text


def test_swift_loss_false_turn_trains_and_has_no_labels(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """ms-swift's per-message ``"loss": false``: the first answer is context, only the second is learned."""
    ckpt = tiny_checkpoint(FAMILY)
    save_png(tmp_path, "cat.png", make_image(40, 30, seed=1))
    row = {
        "messages": [
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "Zebra crossing.", "loss": False},
            {"role": "user", "content": "And its colour?"},
            {"role": "assistant", "content": "Mostly white."},
        ],
        "images": ["cat.png"],
    }
    data = write_jsonl(tmp_path / "swift.jsonl", [row, row, row])
    assert _train("sft", ckpt, data, tmp_path) == EXIT_OK

    mapper = load_core_mapper(ckpt)
    processor = mapper.processor(ckpt)
    rows = load_rows(data, "sft", image_placeholder=processor.image_placeholder)
    labels = mapper.sft_collator(processor)([rows[0]])["labels"][0]
    supervised = processor.tokenizer.decode([int(t) for t in labels if t != IGNORE_INDEX])
    assert "Mostly white." in supervised
    assert "Zebra" not in supervised
