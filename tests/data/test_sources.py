"""Tests for resonance.data.sources: every kind of data source read into raw rows that know their place."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image

from resonance.data.sources import DatasetChoice, RawRow, open_rows
from resonance.errors import ConfigError, DataError

ROWS: list[dict[str, Any]] = [
    {"id": 7, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    {
        "id": 8,
        "messages": [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Ann.", "loss": False}],
    },
]


def list_rows(path: Path, choice: DatasetChoice | None = None) -> list[RawRow]:
    return list(open_rows(path, choice or DatasetChoice()).rows)


def png_bytes(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_parquet_file_reads_every_row_by_index_with_its_id(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    source = open_rows(path)
    rows = list(source.rows)
    assert [row.source for row in rows] == [f"{path}:row 0 (id 7)", f"{path}:row 1 (id 8)"]
    # Arrow gives every message every key; the ones a row did not write (null) are dropped, so rows read as written.
    assert [row.value for row in rows] == ROWS
    assert source.base_dir == tmp_path


@pytest.mark.parametrize("suffix", [".arrow", ".csv"])
def test_arrow_and_csv_files(tmp_path: Path, suffix: str) -> None:
    flat = [{"prompt": "What is it?", "completion": "A cat."}, {"prompt": "And this?", "completion": "A dog."}]
    dataset = datasets.Dataset.from_list(flat)
    path = tmp_path / f"rows{suffix}"
    if suffix == ".csv":
        dataset.to_csv(str(path), index=False)
    else:
        dataset.save_to_disk(str(tmp_path / "disk"))
        path = next((tmp_path / "disk").glob("*.arrow"))
    rows = list(open_rows(path).rows)
    assert [row.value for row in rows] == flat
    assert rows[1].source == f"{path}:row 1"


def test_a_save_to_disk_folder_and_its_splits(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.save_to_disk(str(tmp_path / "one"))
    assert [row.value for row in list_rows(tmp_path / "one")] == ROWS
    datasets.DatasetDict({"train": dataset, "test": dataset.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert len(list_rows(tmp_path / "dict")) == 2  # train by default
    test = list_rows(tmp_path / "dict", DatasetChoice(split="test"))
    assert [row.source for row in test] == [f"{tmp_path / 'dict'}:row 0 (id 8)"]
    with pytest.raises(
        DataError, match=r"no split 'validation'; its splits are 'train', 'test': pick one with --data_split"
    ):
        open_rows(tmp_path / "dict", DatasetChoice(split="validation"))
    with pytest.raises(ConfigError, match="--data_split"):
        open_rows(tmp_path / "one", DatasetChoice(split="test"))


def test_images_in_a_dataset_stay_undecoded_structs(tmp_path: Path) -> None:
    features = datasets.Features({"images": datasets.List(datasets.Image()), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        {"images": [[{"bytes": png_bytes(), "path": None}]], "text": ["hi"]}, features=features
    )
    dataset.save_to_disk(str(tmp_path / "disk"))
    [row] = list_rows(tmp_path / "disk")
    assert row.value["images"] == [{"bytes": png_bytes()}]  # bytes as stored, the null path dropped


def test_a_folder_of_jsonl_files_keeps_line_numbers(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    (tmp_path / "data" / "b.json").write_text(json.dumps([ROWS[1]], indent=1))
    (tmp_path / "data" / ".hidden.jsonl").write_text("not json\n")
    sources = [row.source for row in list_rows(tmp_path / "data")]
    assert sources == [
        f"{tmp_path / 'data' / 'a.jsonl'}:1",
        f"{tmp_path / 'data' / 'a.jsonl'}:3",
        f"{tmp_path / 'data' / 'b.json'}:2",
    ]


def test_a_folder_of_parquet_split_files(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "data" / "train.parquet"))
    datasets.Dataset.from_list(ROWS[:1]).to_parquet(str(tmp_path / "data" / "test.parquet"))
    assert len(list_rows(tmp_path / "data")) == 2
    assert len(list_rows(tmp_path / "data", DatasetChoice(split="test"))) == 1
    with pytest.raises(DataError, match="no split 'dev'.*--data_split"):
        open_rows(tmp_path / "data", DatasetChoice(split="dev"))


def test_a_dataset_name_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as excinfo:
        open_rows("someone/vlm-preferences", DatasetChoice(config="default", split="train", revision="main"))
    message = str(excinfo.value)
    assert message.startswith("someone/vlm-preferences: no such file or folder, and the dataset cannot be loaded")
    assert "save_to_disk" in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("rows.txt", "x", r"unsupported file type \('.txt'\); expected a .jsonl, .json, .parquet"),
        ("missing.jsonl", None, "file not found"),
        ("broken.parquet", "not parquet", "cannot be read by datasets"),
        ("empty", "", "a folder with no data files"),
    ],
)
def test_sources_that_cannot_be_read(tmp_path: Path, name: str, content: str | None, expected: str) -> None:
    path = tmp_path / name
    if name == "empty":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=expected) as excinfo:
        open_rows(path)
    assert str(excinfo.value).startswith(str(path))


def test_config_and_revision_are_refused_for_a_local_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(ConfigError, match="--data_config and --data_revision: .* has no such parts"):
        open_rows(path, DatasetChoice(config="x", revision="main"))
