"""Bad input at run time: unsupported checkpoints, unreadable images, over-long rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers import REPO, write_jsonl
from PIL import Image
from typer.testing import CliRunner

from resonance.base.registry import load_core_mapper
from resonance.cli import app
from resonance.data.rows import load_rows
from resonance.errors import RowError, UnsupportedModelError


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
