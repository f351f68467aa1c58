"""Tests for read_rows beyond one format: datasets-backed sources end to end, images given inside messages or as
data, per-turn supervision keys, audio refused by row, unused fields reported, one format per source."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import pytest
from helpers import write_jsonl
from PIL import Image

from resonance.data.images import ImageCount
from resonance.data.rows import load_rows, read_rows
from resonance.errors import ConfigError, DataError

IMG = {"type": "image", "text": None}


def txt(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def png_bytes(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "b.png")
    return tmp_path


def chat(*turns: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    return {**extra, "messages": [{"role": role, "content": content} for role, content in turns]}


def problems_of(excinfo: pytest.ExceptionInfo[DataError]) -> list[str]:
    return [f"{source}: {message}" for source, message in excinfo.value.errors]


# ------------------------------------------------------------------------------------------ sources


def test_a_parquet_file_with_embedded_images_reads_like_its_jsonl(folder: Path, tmp_path: Path) -> None:
    """datasets' Image feature stores bytes; the rows come out as the JSONL with paths gives them, the images
    written once into the image store, and every problem named by row index and id."""
    rows = [chat(("user", "<image>What colour?"), ("assistant", "Red."), id=f"r{i}") for i in range(3)]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "images": datasets.List(datasets.Image()),
        }
    )
    data = {
        "id": [row["id"] for row in rows],
        "messages": [row["messages"] for row in rows],
        "images": [[{"bytes": png_bytes(), "path": None}]] * 3,
    }
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    loaded = read_rows(path, "sft")
    assert [row["source"] for row in loaded.rows] == [f'{path}:row {i} (id "r{i}")' for i in range(3)]
    stored = {row["images"][0] for row in loaded.rows}
    assert len(stored) == 1 and Path(next(iter(stored))).read_bytes() == png_bytes()  # one file for one image
    assert loaded.rows[0]["messages"][0]["content"] == [IMG, txt("What colour?")]
    assert loaded.format == "messages" and loaded.unused == {}


def test_a_save_to_disk_folder_of_preference_rows_trains_its_split(folder: Path, tmp_path: Path) -> None:
    row = {"prompt": "<image>Colour?", "chosen": "Red.", "rejected": "Blue.", "images": [str(folder / "a.png")]}
    train = datasets.Dataset.from_list([row, row])
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(tmp_path / "prefs"))
    assert len(load_rows(tmp_path / "prefs", "preference")) == 2
    assert len(load_rows(tmp_path / "prefs", "preference", data_split="test")) == 1


def test_an_empty_dataset_and_a_column_of_the_wrong_type(tmp_path: Path) -> None:
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict(
        {"messages": []}, features=datasets.Features({"messages": datasets.Value("string")})
    ).to_parquet(str(empty))
    with pytest.raises(DataError, match=r"empty.parquet: no rows: it holds no data"):
        read_rows(empty, "sft")
    wrong = tmp_path / "wrong.parquet"
    datasets.Dataset.from_dict({"messages": ["hello", "again"]}).to_parquet(str(wrong))
    with pytest.raises(DataError) as excinfo:
        read_rows(wrong, "sft")
    assert problems_of(excinfo) == [
        f"{wrong}:row {i}: messages: must be a list of messages, got a string" for i in range(2)
    ]


# ------------------------------------------------------------------------------------- images inline


def test_images_given_inside_the_messages(folder: Path) -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes("green")).decode()
    rows = [
        chat(
            ("user", [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Colour?"}]), ("assistant", "Red.")
        ),
        chat(
            ("user", [{"type": "image", "path": "b.png"}, {"type": "image", "url": (folder / "a.png").as_uri()}]),
            ("assistant", "Both."),
        ),
        chat(
            ("user", [{"type": "image_url", "image_url": {"url": data_uri}}, {"type": "text", "text": "And?"}]),
            ("assistant", "Green."),
        ),
    ]
    loaded = read_rows(write_jsonl(folder / "d.jsonl", rows), "sft")
    first, second, third = loaded.rows
    assert first["images"] == [str(folder / "a.png")] and first["messages"][0]["content"] == [IMG, txt("Colour?")]
    assert second["images"] == [str(folder / "b.png"), str(folder / "a.png")]
    assert Path(third["images"][0]).read_bytes() == png_bytes("green")


def test_an_image_url_is_refused_unless_allowed(folder: Path) -> None:
    row = chat(
        ("user", [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]), ("assistant", "A cat.")
    )
    with pytest.raises(DataError) as excinfo:
        read_rows(write_jsonl(folder / "d.jsonl", [row]), "sft")
    [problem] = problems_of(excinfo)
    assert problem.endswith(
        "d.jsonl:1: messages[0].content[0].image_url: 'https://example.com/cat.png' is a URL; pass "
        "--allow_image_urls to download it, or give a local path"
    )


def test_image_root_resolves_relative_paths(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = write_jsonl(
        tmp_path / "data" / "d.jsonl", [chat(("user", "<image>Hi"), ("assistant", "Yo."), images=["a.png"])]
    )
    with pytest.raises(DataError, match=r"image file not found: .*data/a.png \(relative to the data file's folder"):
        read_rows(path, "sft")
    assert read_rows(path, "sft", image_root=folder).rows[0]["images"] == [str(folder / "a.png")]


# -------------------------------------------------------------------------------- per-turn supervision


def test_per_turn_loss_keys_become_train_false(folder: Path) -> None:
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "loss": False},
        {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Ann.", "loss": True},
    ]
    axolotl = [{**turns[0], "training": False}, {**turns[1], "loss": None, "weight": 0}, turns[2], turns[3]]
    dataset = load_rows(write_jsonl(folder / "d.jsonl", [{"messages": turns}, {"messages": axolotl}]), "sft")
    for row in dataset:
        assert [m["train"] for m in row["messages"]] == [None, False, None, None]


@pytest.mark.parametrize(
    ("turn", "problem"),
    [
        ({"role": "assistant", "content": "x", "loss": "no"}, "messages[1].loss: must be true or false"),
        ({"role": "assistant", "content": "x", "weight": 0.5}, "messages[1].weight: must be 0 or 1"),
        (
            {"role": "assistant", "content": "x", "loss": False, "training": True},
            "messages[1]: its loss, training disagree",
        ),
        ({"role": "system", "content": "x", "loss": True}, "messages[1]: only assistant turns are supervised"),
        ({"role": "system", "content": "x", "loss": False}, "messages: every answer is marked not to be learned"),
    ],
)
def test_bad_per_turn_loss_keys(folder: Path, turn: dict[str, Any], problem: str) -> None:
    last = {"role": "assistant", "content": "Ok.", **({"loss": False} if turn["role"] == "system" else {})}
    row = {"messages": [{"role": "user", "content": "Hi"}, turn, last]}
    with pytest.raises(DataError) as excinfo:
        read_rows(write_jsonl(folder / "d.jsonl", [row]), "sft")
    assert any(problem in p for p in problems_of(excinfo)), problems_of(excinfo)


# ------------------------------------------------------------------------------------ video and audio


def test_audio_is_refused_by_row_and_counted_when_skipped(folder: Path) -> None:
    """No family takes audio: a row holding one is refused, never trained with the audio dropped (videos:
    tests/data/test_video_rows.py)."""
    rows = [
        {"conversations": [{"from": "human", "value": "<audio>Who speaks?"}, {"from": "gpt", "value": "x"}]},
        chat(("user", [{"type": "input_audio", "input_audio": "a.wav"}]), ("assistant", "x")),
        {**chat(("user", "Who speaks?"), ("assistant", "x")), "audios": ["a.wav"]},
        chat(("user", "<image>Fine."), ("assistant", "Yes."), images=["a.png"]),
    ]
    path = write_jsonl(folder / "d.jsonl", rows)
    with pytest.raises(DataError) as excinfo:
        read_rows(path, "sft")
    found = problems_of(excinfo)
    assert [p.split(": ")[1] for p in found] == [
        "conversations[0].value ('<audio>')",
        "messages[0].content[0]",
        "audios",
    ]
    assert all("no model family here takes audio" in p and "--skip_invalid_rows" in p for p in found)
    loaded = read_rows(path, "sft", skip_invalid=True)
    assert loaded.skipped == 3 and [row["source"] for row in loaded.rows] == [f"{path}:4"]


# ------------------------------------------------------------------------------------------ unused


def test_fields_no_row_keeps_are_reported_once_with_counts(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        chat(("user", "Hi"), ("assistant", "Yo."), source_dataset="web", score=0.5),
        {
            "messages": [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Yo."}],
            "score": 1,
        },
    ]
    with caplog.at_level(logging.WARNING, logger="resonance.data"):
        loaded = read_rows(write_jsonl(folder / "d.jsonl", rows), "sft")
    assert loaded.unused == {"messages[].name": 1, "score": 2, "source_dataset": 1}
    [warning] = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert warning.endswith(
        "fields not used (no canonical row keeps them): 'messages[].name' (1 rows), 'score' (2 rows), "
        "'source_dataset' (1 rows)"
    )


def test_a_prompt_file_reports_the_answers_it_does_not_use(folder: Path) -> None:
    row = {"prompt": "Colour?", "chosen": "Red.", "rejected": "Blue."}
    loaded = read_rows(write_jsonl(folder / "d.jsonl", [row, row]), "prompt")
    assert loaded.unused == {"chosen": 2, "rejected": 2}


# -------------------------------------------------------------------------------------------- formats


def test_other_tools_formats_do_not_mix_in_one_source(folder: Path) -> None:
    rows = [
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo."}]},
        {"query": "Hi", "response": "Yo."},
        {"query": "Hey", "response": "Yo."},
    ]
    path = write_jsonl(folder / "d.jsonl", rows)
    with pytest.raises(DataError) as excinfo:
        read_rows(path, "sft")
    assert str(excinfo.value).splitlines()[0] == (
        f"{path}: rows in 2 formats; one source holds one format (convert the others, or pass --data_format NAME to "
        "read every row as that format)"
    )
    assert [p.split(": ", 1)[0] for p in problems_of(excinfo)] == [f"{path}:2", f"{path}:1"]
    # Resonance's own spellings mix as they always have.
    own = [
        chat(("user", "Hi"), ("assistant", "Yo.")),
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]},
    ]
    assert len(read_rows(write_jsonl(folder / "own.jsonl", own), "sft").rows) == 2


def test_data_format_reads_every_row_as_one_format(folder: Path) -> None:
    row = {"query": "Hi", "response": "Yo.", "history": []}
    path = write_jsonl(folder / "d.jsonl", [row])
    assert read_rows(path, "sft", data_format="swift_query").format == "swift_query"
    with pytest.raises(DataError, match="d.jsonl:1: "):
        read_rows(path, "sft", data_format="messages")
    with pytest.raises(
        ConfigError, match=r"--data_format trl_implicit_preference: holds preference, prompt rows, not the sft rows"
    ):
        read_rows(path, "sft", data_format="trl_implicit_preference")
    with pytest.raises(ConfigError, match="did you mean 'sharegpt'"):
        read_rows(path, "sft", data_format="sharegtp")


def test_sharegpt_with_user_and_assistant_roles(folder: Path) -> None:
    """VL-RLHF's SFT files write from: user / assistant."""
    row = {
        "image": "a.png",
        "conversations": [{"from": "user", "value": "<image>Hi"}, {"from": "assistant", "value": "Yo."}],
    }
    [out] = read_rows(write_jsonl(folder / "d.jsonl", [row]), "sft", image_count=ImageCount(1, 1)).rows
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]
    assert json.dumps(out["messages"][0]["content"]) == json.dumps([IMG, txt("Hi")])


def test_allow_no_rows_reports_a_source_whose_rows_are_all_invalid(folder: Path) -> None:
    path = write_jsonl(folder / "d.jsonl", [{"messages": []}, {"messages": "x"}])
    with pytest.raises(DataError, match="no valid rows"):
        read_rows(path, "sft", skip_invalid=True)
    loaded = read_rows(path, "sft", skip_invalid=True, allow_no_rows=True)
    assert loaded.rows == [] and loaded.skipped == 2 and len(loaded.problems) == 2


def test_a_preference_answer_marked_not_to_be_learned_is_refused(folder: Path) -> None:
    row = {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Yo.", "loss": False}], "rejected": "No."}
    with pytest.raises(DataError) as excinfo:
        read_rows(write_jsonl(folder / "d.jsonl", [row]), "preference")
    assert problems_of(excinfo) == [
        f"{folder / 'd.jsonl'}:1: chosen[0]: marked not to be learned (loss false), but chosen is the answer"
    ]


def test_train_and_eval_read_their_own_splits(folder: Path, tmp_path: Path, tiny_checkpoint: Any) -> None:
    """--data_split picks the training split of a dataset, --eval_data_split the evaluation one (default: the same)."""
    from resonance.algorithms.arguments import DataArguments, ModelArguments
    from resonance.algorithms.setup import load_data_and_processor
    from resonance.base.registry import load_core_mapper

    row = chat(("user", "<image>Colour?"), ("assistant", "Red."), images=[str(folder / "a.png")])
    splits = {"train": [row] * 3, "validation": [row] * 2, "test": [row]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "ds")
    )
    ckpt = tiny_checkpoint("llava")
    model_args = ModelArguments(model_name_or_path=str(ckpt))
    for flags, expected in [
        ({}, (3, 3)),
        ({"data_split": "validation"}, (2, 2)),
        ({"eval_data_split": "test"}, (3, 1)),
    ]:
        data_args = DataArguments(data_path=str(tmp_path / "ds"), eval_data_path=str(tmp_path / "ds"), **flags)
        train, evaluation, _ = load_data_and_processor(load_core_mapper(ckpt), model_args, data_args, "sft")
        assert (len(train), len(evaluation)) == expected, flags
