"""The dataset formats (resonance.data.formats): detection from a row's keys, conversion to the native rows the
loader validates, and a message naming the row's own field for every wrong shape.

The fixture files (helpers.formats) are written from each format's documented shape; the end-to-end check converts
every row and canonicalises it with the loader's row converter, so a format is right when its file gives the same
canonical rows as every other format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from helpers.formats import FIXTURES, PREFERENCE_PAIRS, SFT_CONVERSATIONS
from helpers.images import make_image, save_png

from resonance.data.formats import FORMATS, DataFormat, detect_format, format_hint, format_named
from resonance.data.rows import convert_row
from resonance.errors import ConfigError

# -- every fixture file gives the logical rows -------------------------------------------------------------


def read_file(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


def without_train(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Canonical messages less the per-turn ``train`` flag (checked on the native rows instead)."""
    return [{key: value for key, value in m.items() if key != "train"} for m in messages]


def expected_rows(kind: str, fixture_kind: str, images: list[str]) -> list[dict[str, Any]]:
    """The canonical columns every fixture file of ``fixture_kind`` gives, read as ``kind`` rows."""
    rows = []
    if fixture_kind == "sft":
        for messages, indexes in SFT_CONVERSATIONS:
            columns = {"messages": messages} if kind == "sft" else {"prompt": messages[:-1]}
            rows.append({**columns, "images": [images[i] for i in indexes]})
    else:
        for pair, indexes in PREFERENCE_PAIRS:
            columns = pair if kind == "preference" else {"prompt": pair["prompt"]}
            rows.append({**columns, "images": [images[i] for i in indexes]})
    return rows


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    folder = tmp_path / "pictures"
    folder.mkdir()
    return [save_png(folder, "a.png", make_image(24, 16)), save_png(folder, "b.png", make_image(16, 24, seed=1))]


FILE_KINDS = [(name, fixture.kind) for name, fixture in FIXTURES.items()] + [
    (name, "prompt") for name, fixture in FIXTURES.items() if fixture.kind != "prompt"
]


@pytest.mark.parametrize(("fixture", "kind"), FILE_KINDS)
def test_every_format_file_gives_the_same_canonical_rows(tmp_path: Path, images: list[str], fixture: str, kind: str):
    spec = FIXTURES[fixture]
    folder = tmp_path / "data"
    folder.mkdir()
    path = spec.write(folder, images)
    canonical = []
    for i, row in enumerate(read_file(path)):
        data_format = detect_format(list(row), kind)
        assert data_format is not None and data_format.name == spec.format, (i, row)
        problems: list[str] = []
        native = data_format.to_native(row, kind, problems)
        assert problems == [] and native is not None
        converted = convert_row(native, kind, base_dir=folder, source=f"{path}:{i}")  # type: ignore[arg-type]
        canonical.append(converted)
    expected = expected_rows(kind, spec.kind, images)
    columns = [key for key in expected[0] if key != "images"]
    assert [
        {key: without_train(row[key]) for key in columns} | {"images": row["images"]} for row in canonical
    ] == expected


def without_none(value: Any) -> Any:
    """``value`` less the dict keys that hold ``None`` (what ``datasets`` fills in for another row's field)."""
    if isinstance(value, dict):
        return {key: without_none(item) for key, item in value.items() if item is not None}
    return [without_none(item) for item in value] if isinstance(value, list) else value


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_rows_read_through_datasets_convert_like_the_json(tmp_path: Path, images: list[str], fixture: str):
    """Through ``datasets`` every row has every column of the file, ``None`` where another row has the field."""
    spec = FIXTURES[fixture]
    path = spec.write(tmp_path, images)
    table = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert any(value is None for row in table for value in row.values())  # the case this test is about
    for row, plain in zip(table, read_file(path), strict=True):
        data_format = detect_format([key for key, value in row.items() if value is not None], spec.kind)
        assert data_format is not None and data_format.name == spec.format
        problems: list[str] = []
        from_table = data_format.to_native(row, spec.kind, problems)
        assert problems == [] and without_none(from_table) == without_none(native(spec.format, plain, spec.kind))


def test_prompt_completion_file_supervises_only_the_completion(tmp_path: Path, images: list[str]):
    path = FIXTURES["trl_prompt_completion"].write(tmp_path, images)
    row = read_file(path)[1]  # the multi-turn row: its first answer is in the prompt
    converted = convert_row(native("trl_prompt_completion", row, "sft"), "sft", base_dir=tmp_path)
    assert [m.get("train") for m in converted["messages"]] == [None, False, None, None]


def test_fixtures_cover_every_format():
    assert {fixture.format for fixture in FIXTURES.values()} == {f.name for f in FORMATS}


# -- detection -----------------------------------------------------------------------------------------------

DETECTED = [
    (["conversations", "images"], "sft", "sharegpt"),
    (["conversations", "system", "image", "id"], "prompt", "sharegpt"),
    (["conversations", "chosen", "rejected", "images"], "preference", "sharegpt_preference"),
    (["conversations", "chosen", "rejected", "images"], "prompt", "sharegpt_preference"),
    (["conversations", "chosen", "rejected"], "sft", None),  # a DPO file for SFT: told so, not "no gpt turn"
    (["messages", "images"], "sft", "messages"),
    (["messages"], "prompt", "messages"),
    (["messages"], "preference", None),
    (["messages", "rejected_response", "images"], "preference", "swift_preference"),
    (["messages", "rejected_messages"], "preference", "swift_preference"),
    (["messages", "rejected_response"], "prompt", "swift_preference"),
    (["messages", "rejected_response"], "sft", "messages"),  # the chosen conversation; rejected_response unused
    (["prompt", "chosen", "rejected", "images"], "preference", "trl_preference"),
    (["prompt", "chosen", "rejected"], "prompt", "trl_preference"),
    (["prompt", "chosen", "rejected"], "sft", None),
    (["prompt", "completion", "images"], "sft", "trl_prompt_completion"),
    (["prompt", "completion"], "prompt", "trl_prompt_completion"),
    (["prompt", "completion"], "preference", None),
    (["prompt", "images"], "prompt", "trl_prompt"),
    (["prompt"], "sft", None),
    (["prompt", "chosen"], "prompt", None),  # a preference row missing its rejected answer: told so
    (["chosen", "rejected", "images"], "preference", "trl_implicit_preference"),
    (["chosen", "rejected"], "prompt", "trl_implicit_preference"),
    (["chosen", "rejected"], "sft", None),
    (["conversation", "system", "images"], "sft", "swift_sharegpt"),
    (["conversation"], "prompt", "swift_sharegpt"),
    (["prompt", "completion", "label"], "sft", None),  # TRL unpaired preference (KTO): not trained as SFT
    (["query", "response", "history", "system"], "sft", "swift_query"),
    (["query", "response", "rejected_response"], "preference", "swift_query"),
    (["query"], "prompt", "swift_query"),
    (["instruction", "input", "output"], "sft", "alpaca"),
    (["instruction", "input", "chosen", "rejected"], "preference", "alpaca"),
    (["instruction"], "prompt", "alpaca"),
    (["text", "image"], "sft", None),
]


@pytest.mark.parametrize(("keys", "kind", "name"), DETECTED)
def test_detect_format(keys: list[str], kind: str, name: str | None):
    detected = detect_format(keys, kind)
    assert (detected.name if detected else None) == name


def test_formats_are_named_once_and_each_feeds_a_kind():
    names = [f.name for f in FORMATS]
    assert len(names) == len(set(names))
    assert all(f.kinds and f.kinds <= {"sft", "preference", "prompt"} and f.summary for f in FORMATS)


# -- conversions --------------------------------------------------------------------------------------------


def native(name: str, row: dict[str, Any], kind: str) -> dict[str, Any]:
    problems: list[str] = []
    converted = format_named(name).to_native(row, kind, problems)
    assert problems == [] and converted is not None
    return converted


def test_native_formats_are_the_identity():
    row = {"messages": [{"role": "user", "content": "Hi"}], "images": ["a.png"], "id": 3}
    assert native("messages", row, "sft") is row
    pref = {"prompt": "Hi", "chosen": "Yes.", "rejected": "No.", "margin": 1.5}
    assert native("trl_preference", pref, "preference") is pref
    assert native("trl_prompt", {"prompt": "Hi"}, "prompt") == {"prompt": "Hi"}


def test_sharegpt_system_column_becomes_the_first_turn():
    row = {"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo"}]}
    assert native("sharegpt", row, "sft") is row
    converted = native("sharegpt", {**row, "system": "Be brief.", "images": ["a.png", "b.png"]}, "sft")
    assert converted == {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>Hi"},
            {"from": "gpt", "value": "Yo"},
        ],
        "images": ["a.png", "b.png"],
    }


def test_sharegpt_preference_becomes_prompt_chosen_rejected():
    row = {
        "conversations": [
            {"from": "human", "value": "<image>What is it?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "user", "value": "Colour?"},  # VL-RLHF's roles are taken too
        ],
        "chosen": {"from": "gpt", "value": "Black."},
        "rejected": {"from": "assistant", "value": "White."},
        "system": "Be brief.",
        "images": ["a.png"],
        "id": "x1",
    }
    assert native("sharegpt_preference", row, "preference") == {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Colour?"},
        ],
        "chosen": [{"role": "assistant", "content": "Black."}],
        "rejected": [{"role": "assistant", "content": "White."}],
        "images": ["a.png"],
        "id": "x1",
    }


def test_swift_rejected_response_is_the_other_last_answer():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image><image>Which?"},
        {"role": "assistant", "content": "The first.", "loss": True},
    ]
    row = {"messages": messages, "rejected_response": "The second.", "images": ["a.png", "b.png"], "margin": 2}
    assert native("swift_preference", row, "preference") == {
        "prompt": messages[:2],
        "chosen": messages[2:],
        "rejected": [{"role": "assistant", "content": "The second."}],
        "images": ["a.png", "b.png"],
        "margin": 2,
    }


def test_swift_rejected_messages_share_the_prompt():
    prompt = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    row = {
        "messages": [*prompt, {"role": "assistant", "content": "good"}],
        "rejected_messages": [*prompt, {"role": "assistant", "content": "bad"}],
    }
    assert native("swift_preference", row, "preference") == {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_trl_implicit_prompt_is_the_shared_turns():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    ]
    row = {
        "chosen": [*prompt, {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
        "rejected": [*prompt, {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}],
        "images": ["a.png"],
    }
    expected = {"prompt": prompt, "chosen": row["chosen"][2:], "rejected": row["rejected"][2:], "images": ["a.png"]}
    assert native("trl_implicit_preference", row, "preference") == expected
    assert native("trl_implicit_preference", row, "prompt") == expected  # the loader ignores the answers


def test_trl_prompt_completion_trains_only_the_completion():
    assert native("trl_prompt_completion", {"prompt": "<image>Hi", "completion": "Yo", "images": ["a.png"]}, "sft") == {
        "messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo"}],
        "images": ["a.png"],
    }
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    completion = [{"role": "assistant", "content": "A2"}]
    converted = native("trl_prompt_completion", {"prompt": prompt, "completion": completion}, "sft")
    assert converted == {"messages": [*prompt[:2], {**prompt[2], "loss": False}, prompt[3], *completion]}
    assert "loss" not in prompt[2]  # the row is not changed in place
    row = {"prompt": prompt, "completion": completion}
    assert native("trl_prompt_completion", row, "prompt") is row  # the completion is not used for prompts


def test_swift_sharegpt_rounds_become_messages():
    row = {
        "system": "Be brief.",
        "conversation": [{"human": "<image>Q1", "assistant": "A1"}, {"human": "Q2", "assistant": "A2"}],
    }
    assert native("swift_sharegpt", {**row, "images": ["a.png"]}, "sft") == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ],
        "images": ["a.png"],
    }


def test_swift_query_history_and_system():
    row = {
        "system": "Be brief.",
        "query": "Colour?",
        "response": "Black.",
        "history": [["<image>What is it?", "A cat."]],
        "images": ["a.png"],
    }
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>What is it?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Colour?"},
    ]
    assert native("swift_query", row, "sft") == {
        "messages": [*turns, {"role": "assistant", "content": "Black."}],
        "images": ["a.png"],
    }
    assert native("swift_query", row, "prompt") == {"prompt": turns, "response": "Black.", "images": ["a.png"]}
    preference = native("swift_query", {**row, "rejected_response": "White."}, "preference")
    assert preference == {"prompt": turns, "chosen": "Black.", "rejected": "White.", "images": ["a.png"]}
    # for SFT the rejected answer stays in the row, for the loader to report as unused
    assert native("swift_query", {**row, "rejected_response": "White."}, "sft")["rejected_response"] == "White."


def test_alpaca_joins_instruction_and_input_with_a_newline():
    row = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": None, "history": None}
    assert native("alpaca", row, "sft") == {
        "messages": [{"role": "user", "content": "Translate.\nBonjour"}, {"role": "assistant", "content": "Hello"}]
    }
    pair = native("alpaca", {"instruction": "<image>Which?", "input": "", "chosen": "A", "rejected": "B"}, "preference")
    assert pair == {"prompt": [{"role": "user", "content": "<image>Which?"}], "chosen": "A", "rejected": "B"}


def test_a_column_of_none_is_absent():
    """``datasets`` gives each row every column of the file; ``None`` is another row's column, not a value."""
    row = {"query": "Q", "response": "A", "system": None, "history": None, "rejected_response": None}
    assert native("swift_query", row, "sft") == {
        "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "rejected_response": None,
    }
    assert native("sharegpt", {"conversations": [], "system": None}, "sft") == {"conversations": [], "system": None}


# -- wrong shapes: one message naming the row's own field ------------------------------------------------------

USER, ANSWER = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
ANSWER_B = {"from": "gpt", "value": "B"}
BAD_ROWS = [
    ("sharegpt", "sft", {"conversations": [{"from": "human", "value": "Q"}], "system": 3}, "system: must be a string"),
    (
        "sharegpt",
        "sft",
        {"conversations": [{"from": "system", "value": "S"}], "system": "S"},
        "system: the conversation starts with a 'system' turn too",
    ),
    (
        "sharegpt_preference",
        "preference",
        {"conversations": "Q", "chosen": {"from": "gpt", "value": "A"}, "rejected": {"from": "gpt", "value": "B"}},
        "conversations: must be a list of",
    ),
    (
        "sharegpt_preference",
        "preference",
        {
            "conversations": [{"from": "bot", "value": "Q"}],
            "chosen": {"from": "gpt", "value": "A"},
            "rejected": ANSWER_B,
        },
        "conversations[0].from: unknown value 'bot'",
    ),
    (
        "sharegpt_preference",
        "preference",
        {"conversations": [{"from": "human", "value": "Q"}], "chosen": "A", "rejected": {"from": "gpt", "value": "B"}},
        'chosen: must be an object {"from"',
    ),
    (
        "sharegpt_preference",
        "preference",
        {
            "conversations": [{"from": "human", "value": "Q"}],
            "chosen": {"from": "gpt", "value": "A"},
            "rejected": {"from": "human", "value": "B"},
        },
        "rejected.from: must be 'gpt'",
    ),
    (
        "sharegpt_preference",
        "preference",
        {
            "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
            "chosen": {"from": "gpt", "value": "A"},
            "rejected": {"from": "gpt", "value": "B"},
        },
        "conversations: must end with the human turn",
    ),
    (
        "sharegpt_preference",
        "preference",
        {
            "conversations": [{"from": "human", "value": ["Q"]}],
            "chosen": {"from": "gpt", "value": "A"},
            "rejected": {"from": "gpt", "value": "B"},
        },
        "conversations[0].value: must be a string, got a list",
    ),
    ("swift_preference", "preference", {"messages": [USER, ANSWER], "rejected_response": 5}, "rejected_response: must"),
    (
        "swift_preference",
        "preference",
        {"messages": [USER, ANSWER], "rejected_response": "A"},
        "rejected_response: the same as the chosen answer",
    ),
    ("swift_preference", "preference", {"messages": [USER], "rejected_response": "B"}, "messages: must end with"),
    (
        "swift_preference",
        "preference",
        {"messages": [USER, ANSWER], "rejected_messages": "B"},
        "rejected_messages: text; an implicit-prompt pair is two conversations (lists of messages) that share their"
        " prompt turns; for text answers give the rejected text in 'rejected_response'",
    ),
    ("swift_preference", "preference", {"messages": [ANSWER], "rejected_response": "B"}, "messages: no 'user' turn"),
    ("swift_preference", "preference", {"messages": "Q", "rejected_response": "B"}, "messages: must be a list"),
    ("swift_preference", "preference", {"messages": [], "rejected_response": "B"}, "messages: empty conversation"),
    ("swift_preference", "preference", {"messages": ["Q"], "rejected_response": "B"}, "messages[0]: a message must"),
    (
        "swift_preference",
        "preference",
        {"messages": [USER, ANSWER], "rejected_response": "B", "rejected_messages": [USER, ANSWER]},
        "has both 'rejected_response' and 'rejected_messages'",
    ),
    (
        "swift_preference",
        "preference",
        {"messages": [USER, ANSWER], "rejected_response": "B", "prompt": "Q"},
        "has both 'messages', 'rejected_response' and 'prompt'",
    ),
    ("trl_prompt_completion", "sft", {"prompt": 1, "completion": "A"}, "prompt: must be a list of messages"),
    ("trl_prompt_completion", "sft", {"prompt": "Q", "completion": [USER]}, "completion[0].role: must be 'assistant'"),
    ("swift_sharegpt", "sft", {"conversation": {"human": "Q"}}, "conversation: must be a list of {"),
    (
        "swift_sharegpt",
        "sft",
        {"conversation": [{"from": "human", "value": "Q"}]},
        'conversation[0]: must be an object {"human": str, "assistant": str}; {"from", "value"} turns go in "conv',
    ),
    ("swift_sharegpt", "sft", {"conversation": [{"human": "Q", "assistant": "A"}], "system": 1}, "system: must be"),
    ("swift_query", "sft", {"query": "Q"}, "missing field 'response' (the answer to train on)"),
    ("swift_query", "sft", {"query": ["Q"], "response": "A"}, "query: must be a string, got a list"),
    ("swift_query", "sft", {"query": "Q", "response": "A", "history": "[['q', 'a']]"}, "history: must be a list"),
    ("swift_query", "sft", {"query": "Q", "response": "A", "history": [["q"]]}, "history[0]: must be a [query, resp"),
    ("swift_query", "preference", {"query": "Q", "response": "A"}, "missing field 'rejected_response'"),
    (
        "alpaca",
        "sft",
        {"instruction": "Q", "chosen": "A", "rejected": "B"},
        "missing field 'output' (the answer to train on; 'chosen' / 'rejected' are for DPO)",
    ),
    (
        "sharegpt_preference",
        "preference",
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}], "system": "S"}
        | {"chosen": ANSWER_B, "rejected": {"from": "gpt", "value": "C"}},
        "system: the conversation starts with a 'system' turn too",
    ),
    ("alpaca", "sft", {"instruction": "Q", "input": 2, "output": "A"}, "input: must be a string, got a number"),
    ("alpaca", "preference", {"instruction": "Q", "output": "A", "rejected": "B"}, "missing field 'chosen'"),
    ("alpaca", "sft", {"input": "Q", "output": "A"}, "missing field 'instruction' (alpaca rows are {"),
    ("trl_prompt", "sft", {"prompt": "Q"}, "trl_prompt rows are for `resonance generate`"),
]


@pytest.mark.parametrize(("name", "kind", "row", "message"), BAD_ROWS)
def test_wrong_shapes_name_the_field(name: str, kind: str, row: dict[str, Any], message: str):
    problems: list[str] = []
    assert format_named(name).to_native(row, kind, problems) is None
    assert len(problems) == 1 and message in problems[0], problems


def implicit_problems(chosen: Any, rejected: Any) -> list[str]:
    problems: list[str] = []
    assert (
        format_named("trl_implicit_preference").to_native(
            {"chosen": chosen, "rejected": rejected}, "preference", problems
        )
        is None
    )
    return problems


@pytest.mark.parametrize(
    ("chosen", "rejected", "message"),
    [
        ([USER, ANSWER], [{"role": "user", "content": "other"}, ANSWER], "chosen and rejected share no leading turns"),
        (
            [USER, ANSWER, USER, {"role": "assistant", "content": "x"}],
            [USER, ANSWER, {"role": "user", "content": "other"}, ANSWER],
            "chosen[2] and rejected[2] differ after an 'assistant' turn",
        ),
        ([USER, ANSWER], [USER, ANSWER], "chosen and rejected are the same conversation"),
        ([USER, ANSWER], [USER, ANSWER, USER, ANSWER], "differ only by turns added at the end"),
        (
            [USER, {"role": "assistant", "content": "x"}, USER, ANSWER],
            [USER, ANSWER, USER, ANSWER],
            "chosen[2]: a 'user' turn after the two conversations diverge at chosen[1]",
        ),
        ("A cat.", "A dog.", "chosen and rejected: text; an implicit-prompt pair is two conversations"),
        ([USER, ANSWER], "A dog.", "rejected: text;"),
        ([USER, ANSWER], {"role": "assistant"}, "rejected: must be a list of messages, got an object"),
    ],
)
def test_implicit_prompt_must_be_shared_turns_ending_with_a_user_turn(chosen: Any, rejected: Any, message: str):
    problems = implicit_problems(chosen, rejected)
    assert len(problems) == 1 and message in problems[0], problems


# -- names and hints -------------------------------------------------------------------------------------------


def test_format_named():
    assert isinstance(format_named("alpaca"), DataFormat)
    with pytest.raises(ConfigError, match=r"--data_format: unknown format 'sharegtp'; did you mean 'sharegpt'\?"):
        format_named("sharegtp")
    with pytest.raises(ConfigError, match="the formats are sharegpt_preference, sharegpt, .*, or 'auto'") as error:
        format_named("xyz")
    assert "did you mean" not in str(error.value)


def test_hint_names_the_format_a_row_has_and_its_command():
    hint = format_hint(["prompt", "chosen", "rejected", "images"], "sft")
    assert hint == (
        "this looks like a trl_preference row, for `resonance train dpo` or `rm`;"
        " sft rows are written as sharegpt, messages, trl_prompt_completion, swift_sharegpt, swift_query, alpaca"
    )
    assert "looks like a messages row, for `resonance train sft`;" in format_hint(["messages"], "preference")
    assert "looks like a sharegpt_preference row" in format_hint(["conversations", "chosen", "rejected"], "sft")
    assert "for `resonance generate` or `resonance train grpo` / `ppo`" in format_hint(["prompt"], "sft")


def test_hint_without_a_format_suggests_spellings_and_the_closest_formats():
    assert format_hint(["mesages", "images"], "sft") == (
        "'mesages': did you mean 'messages'? no sft format has any of these fields;"
        " the sft formats are sharegpt, messages, trl_prompt_completion, swift_sharegpt, swift_query, alpaca"
    )
    preference = format_hint(["prompt", "chosen", "images"], "preference")  # no 'rejected'
    assert preference.startswith("the closest preference format: trl_preference (missing 'rejected'): {")
    unpaired = format_hint(["prompt", "completion", "label"], "sft")
    assert unpaired.startswith("the closest sft format: trl_prompt_completion (but with 'label', not in this format)")
