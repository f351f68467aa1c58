"""Bad input at run time: unsupported checkpoints, unreadable images, over-long rows."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, REWARDS, train_argv, write_data, write_jsonl
from PIL import Image
from typer.testing import CliRunner

from resonance.base.registry import load_core_mapper
from resonance.cli import app, main
from resonance.data.images import image_problem
from resonance.data.rows import load_rows
from resonance.errors import EXIT_INPUT, RowError, UnsupportedModelError


def test_unsupported_architecture_lists_supported_and_how_to_add(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FancyVLMForConditionalGeneration"]}))
    with pytest.raises(UnsupportedModelError) as info:
        load_core_mapper(tmp_path)
    message = str(info.value)
    assert "'FancyVLMForConditionalGeneration' has no Resonance adapter" in message
    assert "LlavaForConditionalGeneration (llava)" in message
    assert "resonance scaffold specs/<name>.yaml" in message


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        load_core_mapper(tmp_path)


def _sft_file(tmp_path: Path, rows: list[dict]) -> Path:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    return write_jsonl(tmp_path / "train.jsonl", rows)


def _row(text: str = "What colour?", answer: str = "Red.") -> dict:
    return {
        "image": "red.png",
        "conversations": [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer}],
    }


@pytest.fixture
def llava(tiny_checkpoint):
    path = tiny_checkpoint("llava")
    mapper = load_core_mapper(path)
    return mapper, mapper.processor(path)


def test_unreadable_image_names_file_and_line(tmp_path: Path, llava) -> None:
    mapper, processor = llava
    rows = load_rows(_sft_file(tmp_path, [_row(), _row()]), "sft")
    (tmp_path / "red.png").write_bytes(b"not a png any more")
    with pytest.raises(RowError, match=r"train.jsonl:1: cannot read image .*red.png"):
        mapper.sft_collator(processor)([rows[0], rows[1]])


def _truncated_jpeg(path: Path) -> None:
    """Overwrite ``path`` with the first half of a JPEG: it opens and passes PIL's ``verify()`` (the check made of
    every row's images where the data file is read), and decoding its pixels fails only when its row is collated."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
    path.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    assert image_problem(str(path)) is None


@pytest.mark.parametrize(("algorithm", "workers"), [("sft", 0), ("sft", 1), ("ppo", 1)])
def test_an_image_that_fails_in_collation_is_one_line_from_a_loader_worker_too(
    algorithm: str, workers: int, tmp_path: Path, tiny_checkpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker's error reaches the loading process as torch rebuilds it: the worker's traceback as its message, or a
    RuntimeError where the type cannot be rebuilt from that. The command prints the row's own error line either way
    (PPO reads its steps in its own loader; SFT in the Trainer's)."""
    data = write_data(tmp_path, "prompt" if algorithm == "ppo" else algorithm)
    _truncated_jpeg(tmp_path / "row2.png")
    reward = {"reward_funcs": f"{REWARDS}:token_sum_reward"} if algorithm == "ppo" else {}
    argv = train_argv(
        algorithm, tiny_checkpoint("llava"), data, tmp_path / "out", dataloader_num_workers=workers, **reward
    )
    assert main(["train", algorithm, *argv]) == EXIT_INPUT
    err = capsys.readouterr().err
    line = rf"^error: \S*{data.name}:2: cannot read image \S*row2\.png: image file is truncated"
    assert re.search(line, err, re.MULTILINE), err
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_long_row_is_an_error_naming_its_line(tmp_path: Path, llava) -> None:
    mapper, processor = llava
    rows = load_rows(_sft_file(tmp_path, [_row(), _row("word " * 200)]), "sft")
    collator = mapper.sft_collator(processor, max_length=64)
    with pytest.raises(RowError, match=r"train.jsonl:2: \d+ tokens > --max_length 64"):
        collator([rows[0], rows[1]])


def test_long_row_skipped_and_counted_with_flag(tmp_path: Path, llava, caplog: pytest.LogCaptureFixture) -> None:
    mapper, processor = llava
    rows = load_rows(_sft_file(tmp_path, [_row(), _row("word " * 200)]), "sft")
    collator = mapper.sft_collator(processor, max_length=64, skip_long_rows=True)
    with caplog.at_level(logging.WARNING, logger="resonance.data"):
        batch = collator([rows[0], rows[1]])
    assert batch["input_ids"].shape[0] == 1
    assert collator.skipped_rows == 1
    assert "train.jsonl:2" in caplog.text


def test_models_command_lists_every_family() -> None:
    result = CliRunner().invoke(app, ["models", "--project", str(REPO)])
    assert result.exit_code == 0
    for spec in (REPO / "specs").glob("*.yaml"):
        assert spec.stem in result.stdout
