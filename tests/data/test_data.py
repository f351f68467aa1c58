"""Tests for resonance.data.rows: both SFT formats, preference rows, canonical parts, and every data error."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
from helpers import EXAMPLES, write_jsonl
from PIL import Image

from resonance.data.images import ImageCount
from resonance.data.rows import convert_row, features_for, load_rows, read_rows, text_to_parts
from resonance.errors import DataError

IMG = {"type": "image", "text": None}


def txt(text: str) -> dict[str, Any]:
    """A canonical text part."""
    return {"type": "text", "text": text}


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [txt(text)]}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder with ``a.png`` and ``b.png`` (tiny valid images) and ``bad.png`` (not an image)."""
    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "b.png")
    (tmp_path / "bad.png").write_text("not a png")
    return tmp_path


def load_one(path: Path, kind: str, row: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    ds = load_rows(write_jsonl(path, [row]), kind, **kwargs)  # type: ignore[arg-type]
    assert len(ds) == 1
    return ds[0]


def problems(excinfo: pytest.ExceptionInfo[DataError]) -> list[str]:
    return [f"{source}: {message}" for source, message in excinfo.value.errors]


def llava(value: str = "<image>\nWhat colour?", **extra: Any) -> dict[str, Any]:
    return {
        "image": "a.png",
        **extra,
        "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "Red."}],
    }


# --------------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("<image>\nWhat is it?", [IMG, txt("What is it?")]),
        ("What is it?\n<image>", [txt("What is it?\n"), IMG]),
        ("Left <image> right", [txt("Left "), IMG, txt(" right")]),
        ("<image>\n\nTwo newlines", [IMG, txt("\nTwo newlines")]),
        ("<image>\r\nCRLF", [IMG, txt("CRLF")]),
        ("<image><image>\nBoth", [IMG, IMG, txt("Both")]),
        ("<image>", [IMG]),
        ("", []),
        ("no image", [txt("no image")]),
    ],
)
def test_text_to_parts(text: str, parts: list[dict[str, Any]]) -> None:
    assert text_to_parts(text) == parts


def test_custom_placeholder_leaves_the_default_one_as_text(data_dir: Path) -> None:
    row = load_one(data_dir / "d.jsonl", "sft", llava("<img>\nSee <image>?"), image_placeholder="<img>")
    assert row["messages"][0]["content"] == [IMG, txt("See <image>?")]


# ----------------------------------------------------------------------------------------------- SFT


def test_llava_style(data_dir: Path) -> None:
    row = {
        "id": "x1",
        "image": "a.png",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    path = write_jsonl(data_dir / "llava.jsonl", ["", row])
    out = load_rows(path, "sft")[0]
    assert out == {
        "messages": [
            {"role": "system", "content": [txt("Be brief.")]},
            user(IMG, txt("What colour?")),
            assistant("Red."),
            user(txt("Sure?")),
            assistant("Yes."),
        ],
        "images": [str(data_dir / "a.png")],
        "source": f"{path}:2",
    }


def test_chat_style_with_parts_and_strings(data_dir: Path) -> None:
    row = {
        "images": ["a.png"],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look: "},
                    {"type": "image"},
                    {"type": "text", "text": "ok?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "Still red."},
        ],
    }
    out = load_one(data_dir / "chat.jsonl", "sft", row)
    assert out["messages"] == [
        user(txt("Look: "), IMG, txt("ok?")),
        assistant("Red."),
        user(txt("And now?")),
        assistant("Still red."),
    ]
    assert out["images"] == [str(data_dir / "a.png")]


def test_images_without_placeholder_go_first_in_first_user_message(data_dir: Path) -> None:
    row = {
        "images": ["a.png", "b.png"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Compare them."},
            {"role": "assistant", "content": "Red, then blue."},
        ],
    }
    out = load_one(data_dir / "d.jsonl", "sft", row)
    assert out["messages"][1] == user(IMG, IMG, txt("Compare them."))
    assert out["messages"][0] == {"role": "system", "content": [txt("Be brief.")]}


def test_multi_image_keeps_positions_and_order(data_dir: Path) -> None:
    row = llava("First <image>\nthen <image>\nwhich is red?")
    del row["image"]
    row["images"] = ["b.png", "a.png"]
    out = load_one(data_dir / "d.jsonl", "sft", row)
    assert out["messages"][0]["content"] == [txt("First "), IMG, txt("then "), IMG, txt("which is red?")]
    assert out["images"] == [str(data_dir / "b.png"), str(data_dir / "a.png")]


def test_text_only_rows_mix_with_image_rows_in_one_schema(data_dir: Path) -> None:
    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path = write_jsonl(data_dir / "mix.jsonl", [text_only, llava(), text_only])
    ds = load_rows(path, "sft")
    assert ds.features == features_for("sft")
    assert ds["images"] == [[], [str(data_dir / "a.png")], []]
    assert ds[0]["messages"] == [user(txt("Hi")), assistant("Hello")]


def test_image_counts_a_family_cannot_take_are_row_errors(data_dir: Path) -> None:
    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    two = llava("<image><image>\nWhich is red?")
    del two["image"]
    two["images"] = ["a.png", "b.png"]
    path = write_jsonl(data_dir / "mix.jsonl", [text_only, llava(), two])
    assert len(load_rows(path, "sft")) == 3  # families that take any count
    with pytest.raises(DataError) as excinfo:
        load_rows(path, "sft", image_count=ImageCount(1, 1))  # PaliGemma-like and single-image
    assert problems(excinfo) == [
        f"{path}:1: 0 image(s), but this model family needs at least 1 per conversation",
        f"{path}:3: 2 images, but this model family takes at most 1 per conversation",
    ]
    loaded = read_rows(path, "sft", image_count=ImageCount(1, 1), skip_invalid=True)
    assert [row["source"] for row in loaded.rows] == [f"{path}:2"] and loaded.skipped == 2


def test_json_list_file_sources_are_the_lines_where_objects_start(data_dir: Path) -> None:
    path = data_dir / "rows.json"
    path.write_text("[\n" + json.dumps(llava()) + ",\n\n  " + json.dumps(llava(), indent=2) + "\n]\n")
    ds = load_rows(path, "sft")
    assert ds["source"] == [f"{path}:2", f"{path}:4"]


def test_image_paths_resolve_from_the_data_file_folder(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = data_dir / "sets"
    sub.mkdir()
    monkeypatch.chdir(sub)  # the working directory does not matter
    row = llava("<image><image>\nTwo?")
    del row["image"]
    row["images"] = ["../a.png", str(data_dir / "b.png")]
    out = load_one(sub / "d.jsonl", "sft", row)
    assert out["images"] == [str(data_dir / "a.png"), str(data_dir / "b.png")]


def test_canonical_rows_read_back_unchanged(data_dir: Path) -> None:
    row = load_one(data_dir / "d.jsonl", "sft", llava("Hi <image>\nthere"))
    again = convert_row(row, "sft", base_dir=data_dir, source=row["source"])
    assert again == row


def test_check_images_false_skips_file_checks(data_dir: Path) -> None:
    out = load_one(data_dir / "d.jsonl", "sft", llava(image="missing.png"), check_images=False)
    assert out["images"] == [str(data_dir / "missing.png")]


# ----------------------------------------------------------------------------------------- preference


def test_preference_string_form(data_dir: Path) -> None:
    row = {"image": "a.png", "prompt": "<image>\nColour?", "chosen": "Red.", "rejected": "Blue."}
    path = write_jsonl(data_dir / "dpo.jsonl", [row])
    ds = load_rows(path, "preference")
    assert ds.features == features_for("preference")
    assert ds[0] == {
        "prompt": [user(IMG, txt("Colour?"))],
        "chosen": [assistant("Red.")],
        "rejected": [assistant("Blue.")],
        "images": [str(data_dir / "a.png")],
        "source": f"{path}:1",
    }


def test_preference_message_list_form_multi_turn(data_dir: Path) -> None:
    row = {
        "images": ["a.png"],
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What shape?"},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "Colour?"},
        ],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        "rejected": [
            {"role": "assistant", "content": "Blue."},
            {"role": "assistant", "content": "Or green."},
        ],
    }
    out = load_one(data_dir / "dpo.jsonl", "preference", row)
    assert out["prompt"][1] == user(IMG, txt("What shape?"))  # auto-prepended to the first user turn
    assert out["prompt"][3] == user(txt("Colour?"))
    assert out["chosen"] == [assistant("Red.")]
    assert out["rejected"] == [assistant("Blue."), assistant("Or green.")]


def test_preference_text_only_mixes_with_image_rows(data_dir: Path) -> None:
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"image": "a.png", "prompt": "Colour?", "chosen": "Red.", "rejected": "Blue."},
    ]
    ds = load_rows(write_jsonl(data_dir / "dpo.jsonl", rows), "preference")
    assert ds["images"] == [[], [str(data_dir / "a.png")]]
    assert ds[0]["prompt"] == [user(txt("2+2?"))]


def test_examples_load() -> None:
    sft = load_rows(EXAMPLES / "sft.jsonl", "sft")
    dpo = load_rows(EXAMPLES / "dpo.jsonl", "preference")
    assert len(sft) >= 12 and len(dpo) >= 12
    assert any(len(i) == 0 for i in sft["images"]) and any(len(i) == 2 for i in sft["images"])
    assert any(len(i) == 0 for i in dpo["images"])


# --------------------------------------------------------------------------------------------- errors


def row_error(data_dir: Path, kind: str, row: Any) -> list[str]:
    """Write a valid row then ``row`` (line 2), load, and return the problems without their ``FILE:LINE``."""
    path = data_dir / "bad.jsonl"
    good = llava() if kind == "sft" else {"prompt": "Hi", "chosen": "a", "rejected": "b"}
    write_jsonl(path, [good, row])
    with pytest.raises(DataError) as excinfo:
        load_rows(path, kind)  # type: ignore[arg-type]
    found = problems(excinfo)
    assert all(p.startswith(f"{path}:2: ") for p in found), found
    assert str(excinfo.value).startswith(f"{path}: ")
    return [p.split(": ", 1)[1] for p in found]


@pytest.mark.parametrize(
    ("kind", "row", "expected"),
    [
        ("sft", "{not json", "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
        ("sft", "[1, 2]", "a row must be a JSON object, got a list"),
        (
            "sft",
            {"image": "a.png"},
            "missing field 'conversations' or 'messages' (found 'image'); SFT rows are LLaVA",
        ),
        (
            "preference",
            {"prompt": "Hi", "rejected": "no"},
            "missing field(s) 'chosen' (found 'prompt', 'rejected')",
        ),
        (
            "sft",
            {"conversations": [{"from": "bot", "value": "x"}]},
            "conversations[0].from: unknown value 'bot'; expected one of 'human', 'gpt', 'system'",
        ),
        (
            "sft",
            {"messages": [{"role": "model", "content": "x"}]},
            "messages[0].role: unknown value 'model'; expected one of 'system', 'user', 'assistant'",
        ),
        ("sft", {"messages": [{"role": "user"}]}, "messages[0]: missing 'content'"),
        ("sft", {"messages": []}, "messages: empty conversation"),
        ("sft", {"messages": "hello"}, "messages: must be a list of messages, got a string"),
        ("sft", {"conversations": [{"from": "human", "value": "Hi"}]}, "conversations: no 'gpt' turn"),
        (
            "sft",
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
            "messages[1]: empty assistant turn",
        ),
        (
            "preference",
            {
                "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                "chosen": "a",
                "rejected": "b",
            },
            "prompt: the last message must be a user turn",
        ),
        ("preference", {"prompt": "Hi", "chosen": "", "rejected": "b"}, "chosen: is empty"),
        ("preference", {"prompt": "Hi", "chosen": "a", "rejected": []}, "rejected: is empty"),
        (
            "preference",
            {"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            "chosen[0].role: must be 'assistant'",
        ),
        (
            "sft",
            llava(image="missing.png"),
            "image: image file not found: {d}/missing.png (relative to the data file's folder {d})",
        ),
        (
            "sft",
            llava(image="bad.png"),
            "image: cannot be opened as an image: {d}/bad.png (UnidentifiedImageError",
        ),
        ("sft", llava(image=["a.png", 3]), "image[1]: int 3 is not an image reference; images are a path"),
        (
            "sft",
            llava("<image><image>\nTwo?"),
            "2 image placeholder(s) ('<image>' or image parts) but 1 image(s)",
        ),
        ("preference", {"prompt": "<image>\nHi", "chosen": "a", "rejected": "b"}, "1 image placeholder(s)"),
        (
            "sft",
            {
                "image": "a.png",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image>"}],
            },
            "conversations[1]: image ('<image>' or an image part) in an assistant message",
        ),
        (
            "preference",
            {
                "images": ["a.png"],
                "prompt": "Hi",
                "chosen": [{"role": "assistant", "content": [{"type": "image"}]}],
                "rejected": "b",
            },
            "chosen[0]: image",
        ),
        (
            "sft",
            {
                "images": ["b.png"],
                "messages": [
                    {"role": "user", "content": [{"type": "image", "url": "a.png"}]},
                    {"role": "assistant", "content": "x"},
                ],
            },
            "images given twice: 1 inside the messages and 1 in 'image' / 'images'",
        ),
        (
            "sft",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "video"}]},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "1 video placeholder(s) ('<video>' or video parts) but 0 video(s) in 'video' / 'videos'",
        ),
        (
            "sft",
            '{"image": "a.png", "image": "b.png", "conversations": []}',
            "duplicate key(s) 'image' in one object",
        ),
        ("sft", {**llava(), "images": ["a.png"]}, "has both 'image' and 'images'; keep one"),
        (
            "sft",
            {
                "imgaes": ["a.png"],
                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}],
            },
            "unknown field 'imgaes'; did you mean 'images'?",
        ),
        (
            "sft",
            {
                "image_path": "a.png",
                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}],
            },
            "field 'image_path' holds image path(s) but only 'image' / 'images' are read",
        ),
    ],
)
def test_row_errors_name_file_and_line(data_dir: Path, kind: str, row: Any, expected: str) -> None:
    found = row_error(data_dir, kind, row)
    expected = expected.format(d=data_dir)
    assert any(p.startswith(expected) for p in found), found


def test_wrong_kind_is_named(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "d.jsonl", [llava()])
    with pytest.raises(DataError, match=r"this looks like an SFT row \(for `resonance train sft`\)"):
        load_rows(path, "preference")
    write_jsonl(path, [{"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"this looks like a preference row \(for `resonance train dpo` or `rm`\)"):
        load_rows(path, "sft")


def test_all_problems_of_a_file_in_one_error(data_dir: Path) -> None:
    rows = [
        llava(),
        "",
        "oops",
        llava(image="missing.png"),
        llava(),
        {"messages": [{"role": "x", "content": "y"}]},
    ]
    path = write_jsonl(data_dir / "d.jsonl", rows)
    with pytest.raises(DataError) as excinfo:
        load_rows(path, "sft")
    assert [source for source, _ in excinfo.value.errors] == [f"{path}:3", f"{path}:4", f"{path}:6"]
    assert str(excinfo.value).splitlines()[0] == (
        f"{path}: 3 problem(s) in 3 of 5 rows (fix them, or pass --skip_invalid_rows to drop those rows)"
    )
    assert isinstance(excinfo.value, ValueError)
    copy = pickle.loads(pickle.dumps(excinfo.value))
    assert copy.errors == excinfo.value.errors and str(copy) == str(excinfo.value)


def test_several_problems_of_one_row_are_all_reported(data_dir: Path) -> None:
    row = {
        "image": "missing.png",
        "conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": 3}],
    }
    found = row_error(data_dir, "sft", row)
    assert [p.split(":")[0] for p in found] == ["image", "conversations[0].from", "conversations[1].value"]


def test_long_error_lists_are_truncated(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "d.jsonl", [llava()] + ["{"] * 25)
    with pytest.raises(DataError) as excinfo:
        load_rows(path, "sft")
    assert len(excinfo.value.errors) == 25
    lines = str(excinfo.value).splitlines()
    assert len(lines) == 22 and lines[-1] == "... and 5 more"
    assert lines[1].startswith(f"{path}:2: invalid JSON")


def test_json_list_file_errors(data_dir: Path) -> None:
    path = data_dir / "rows.json"
    path.write_text('[\n  {"image": "a.png",\n   "conversations": [}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        load_rows(path, "sft")
    path.write_text('{"conversations": []}')
    with pytest.raises(DataError, match=r"expected a JSON list of row objects.*use \.jsonl"):
        load_rows(path, "sft")
    path.write_text('[\n1,\n\n{"messages": []}]')
    with pytest.raises(DataError) as excinfo:
        load_rows(path, "sft")
    assert problems(excinfo) == [
        f"{path}:2: a row must be a JSON object, got a number",
        f"{path}:4: messages: empty conversation; it needs at least one message",
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("none.jsonl", None, "file not found"),
        ("data.txt", "a,b\n", "unsupported file type ('.txt'); expected a .jsonl, .json, .parquet"),
        ("data.csv", "a,b\n", "no rows: it holds no data"),
        ("empty.jsonl", "\n\n", "no rows: it holds no data"),
        ("empty.json", "[]", "no rows: it holds no data"),
    ],
)
def test_file_errors(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as excinfo:
        load_rows(path, "sft")
    found = problems(excinfo)
    assert len(found) == 1 and found[0].startswith(f"{path}: {message}"), found


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        load_rows(EXAMPLES / "sft.jsonl", "dpo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_placeholder"):
        load_rows(EXAMPLES / "sft.jsonl", "sft", image_placeholder="")


# ----------------------------------------------------------------------------------------- skip_invalid


def test_skip_invalid_drops_rows_with_a_warning_each(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [llava(), "oops", llava(image="missing.png"), llava(), "[]"]
    path = write_jsonl(data_dir / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="resonance.data"):
        ds = load_rows(path, "sft", skip_invalid=True)
    assert ds["source"] == [f"{path}:1", f"{path}:4"]
    assert ds.info.description == f"2 sft rows from {path}; 3 invalid rows skipped"
    warnings = [r.getMessage() for r in caplog.records if r.name == "resonance.data"]
    assert len(warnings) == 4
    assert warnings[0].startswith(f"skipping invalid row {path}:2: invalid JSON")
    assert warnings[1].startswith(f"skipping invalid row {path}:3: image: image file not found")
    assert warnings[2] == f"skipping invalid row {path}:5: a row must be a JSON object, got a list"
    assert warnings[3] == f"skipped 3 invalid of 5 rows in {path}"

    loaded = read_rows(path, "sft", skip_invalid=True)
    assert loaded.skipped == 3 and [s for s, _ in loaded.problems] == [f"{path}:2", f"{path}:3", f"{path}:5"]


def test_skip_invalid_with_no_valid_row_is_still_an_error(data_dir: Path) -> None:
    path = write_jsonl(data_dir / "d.jsonl", ["oops", llava(image="missing.png")])
    with pytest.raises(DataError, match=r"no valid rows \(2 rows, all invalid\)"):
        load_rows(path, "sft", skip_invalid=True)


def test_clean_file_reports_zero_skipped(data_dir: Path) -> None:
    ds = load_rows(write_jsonl(data_dir / "d.jsonl", [llava()]), "sft", skip_invalid=True)
    assert ds.info.description.endswith("; 0 invalid rows skipped")
