"""Broken checkpoints: each missing or damaged file is one CheckpointError naming the folder and file and what
would be right, raised while loading (adapter lookup, model, processor), never a raw traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from resonance import cli
from resonance.base.registry import load_core_mapper
from resonance.errors import EXIT_INPUT, CheckpointError

LLAVA_PROCESSOR = "resonance.generated.llava"


def _copy(tiny_checkpoint, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llava"), folder)
    return folder


def _truncate(file: Path, size: int | None = None) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if size is None else size])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").write_text("{not json"), r"config.json: not valid JSON \(line 1, column 2"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), r"config.json: holds a JSON list, not an object"),
        (lambda f: (f / "config.json").write_text("{}"), r"config.json: 'architectures' must list the model class"),
        (
            lambda f: (f / "config.json").write_text(json.dumps({"architectures": "LlavaForConditionalGeneration"})),
            r"config.json: 'architectures' must list the model class",
        ),
    ],
)
def test_invalid_config_json(tiny_checkpoint, tmp_path: Path, damage: Callable[[Path], None], message: str) -> None:
    folder = _copy(tiny_checkpoint, tmp_path)
    damage(folder)
    with pytest.raises(CheckpointError, match=rf"^{folder}/{message}"):
        load_core_mapper(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "model.safetensors").unlink(), r": no weights; expected model.safetensors or "),
        (lambda f: _truncate(f / "model.safetensors"), r"/model.safetensors: not a complete safetensors file"),
        (lambda f: _truncate(f / "model.safetensors", 5), r"/model.safetensors: not a complete safetensors file"),
    ],
)
def test_missing_or_truncated_weights(
    tiny_checkpoint, tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    folder = _copy(tiny_checkpoint, tmp_path)
    damage(folder)
    model_class = load_core_mapper(folder).model
    with pytest.raises(CheckpointError, match=rf"^{folder}{message}"):
        model_class.from_pretrained(folder)


def test_missing_shard_of_an_index(tiny_checkpoint, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names shards that are missing: model-00002-of-00002.safetensors"):
        load_core_mapper(folder).model.from_pretrained(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda f: [(f / n).unlink() for n in ("tokenizer.json",)],
            r": no tokenizer files; expected tokenizer.json",
        ),
        (lambda f: _truncate(f / "tokenizer.json"), r"/tokenizer.json: not valid JSON"),
        (
            lambda f: (f / "processor_config.json").unlink(),
            r": no processor configuration; expected processor_config.json or preprocessor_config.json",
        ),
        (lambda f: (f / "processor_config.json").write_text("[1]"), r"/processor_config.json: holds a JSON list"),
    ],
)
def test_missing_or_broken_processor_files(
    tiny_checkpoint, tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    folder = _copy(tiny_checkpoint, tmp_path)
    damage(folder)
    with pytest.raises(CheckpointError, match=rf"^{folder}{message}"):
        load_core_mapper(folder).processor(folder)


def test_a_broken_checkpoint_is_one_line_and_exit_2(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    folder = _copy(tiny_checkpoint, tmp_path)
    _truncate(folder / "model.safetensors")
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Hello?"}) + "\n")
    code = cli.main(
        ["generate", "--model_name_or_path", str(folder), "--data_path", str(data), "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == EXIT_INPUT
    assert "Traceback" not in err
    assert f"{folder}/model.safetensors: not a complete safetensors file" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "format 'other', expected"),
    ],
)
def test_a_head_folder_with_a_broken_description_is_a_checkpoint_error(
    text: str, expected: str, tmp_path: Path, tiny_checkpoint
) -> None:
    """Before: json.JSONDecodeError, or a plain ValueError: a traceback (exit 3) for a bad reward/value folder."""
    from resonance.base.value import VLModelWithValueHead

    folder = tmp_path / "value"
    shutil.copytree(tiny_checkpoint("llava"), folder)
    (folder / VLModelWithValueHead.config_file).write_text(text)
    with pytest.raises(CheckpointError, match=expected):
        VLModelWithValueHead.from_pretrained(folder)
