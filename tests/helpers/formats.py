"""One small data file per dataset format of ``resonance.data.formats``, written by hand from each format's
documented shape (LLaMA-Factory's data/README.md, ms-swift's "Custom Dataset" page, TRL's "Dataset formats"), for
the format tests and the end-to-end training tests.

Every file holds the same three logical rows: :data:`SFT_CONVERSATIONS` for SFT files, :data:`PREFERENCE_PAIRS` for
preference and prompt files (a two-image turn after a system message; a multi-turn conversation with one image; a
text-only row), so each file, loaded, should give these canonical rows. One exception: ``trl_prompt_completion``
trains only the completion, so the first answer of its multi-turn row is not supervised.

Each writer takes a folder and at least two image paths (the rows use images 0 and 1, then image 0; files refer to
them relative to the folder) and returns the written file's path. :data:`FIXTURES` lists them all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.messages import IMAGE, Message, assistant, system, to_text, to_trl, user

# (canonical messages, indexes into the writer's images), per row.
SFT_CONVERSATIONS: list[tuple[list[Message], list[int]]] = [
    (
        [system("Answer briefly."), user(IMAGE, IMAGE, "Which picture is brighter?"), assistant("The first one.")],
        [0, 1],
    ),
    (
        [user(IMAGE, "What is it?"), assistant("A cat."), user("What colour is it?"), assistant("Black.")],
        [0],
    ),
    ([user("Answer in one word.\nIs the sky blue?"), assistant("Yes.")], []),
]

# ({"prompt", "chosen", "rejected"} canonical messages, indexes into the writer's images), per row: the same
# conversations, their last answer the chosen one.
PREFERENCE_PAIRS: list[tuple[dict[str, list[Message]], list[int]]] = [
    (
        {"prompt": messages[:-1], "chosen": messages[-1:], "rejected": [assistant(rejected)]},
        indexes,
    )
    for (messages, indexes), rejected in zip(SFT_CONVERSATIONS, ("The second one.", "White.", "No."), strict=True)
]


def _text(message: Message) -> str:
    return to_text(message, placeholder="<image>")


def _images(folder: Path, images: Sequence[str], indexes: list[int]) -> dict[str, list[str]]:
    """The row's ``images`` field (paths relative to the data file's folder), absent for a text-only row."""
    assert len(images) >= 2, "test bug: the format fixtures need two images"
    return {"images": [os.path.relpath(images[i], folder) for i in indexes]} if indexes else {}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``.json``: one JSON list (LLaMA-Factory's files); ``.jsonl``: one row per line (ms-swift's, TRL's)."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _sharegpt_turn(message: Message) -> dict[str, str]:
    return {"from": {"user": "human", "assistant": "gpt"}[message["role"]], "value": _text(message)}


def _split_system(messages: list[Message]) -> tuple[dict[str, str], list[Message]]:
    """A leading system message as the ``system`` column (LLaMA-Factory, ms-swift), and the other turns."""
    if messages[0]["role"] == "system":
        return {"system": _text(messages[0])}, messages[1:]
    return {}, messages


def _history(messages: list[Message]) -> tuple[dict[str, Any], str]:
    """Turns before the last user turn as ``history`` pairs, and the last user turn's text."""
    *earlier, last = messages
    pairs = [[_text(q), _text(a)] for q, a in zip(earlier[::2], earlier[1::2], strict=True)]
    return ({"history": pairs} if pairs else {}), _text(last)


def _user_format(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": _text(m)} for m in messages]


# -- LLaMA-Factory -------------------------------------------------------------------------------------


def write_sharegpt(folder: Path, images: Sequence[str]) -> Path:
    """LLaMA-Factory / LLaVA sharegpt SFT: ``conversations`` of ``{"from", "value"}``, the system prompt in
    ``system``, ``images``."""
    rows = []
    for messages, indexes in SFT_CONVERSATIONS:
        columns, turns = _split_system(messages)
        rows.append(
            {"conversations": [_sharegpt_turn(m) for m in turns], **columns, **_images(folder, images, indexes)}
        )
    return _write(folder / "sharegpt.json", rows)


def write_sharegpt_preference(folder: Path, images: Sequence[str]) -> Path:
    """LLaMA-Factory sharegpt preference: ``conversations`` ending with the human turn, ``chosen`` / ``rejected``
    as one ``{"from": "gpt", "value"}`` object each."""
    rows = []
    for pair, indexes in PREFERENCE_PAIRS:
        columns, turns = _split_system(pair["prompt"])
        answers = {name: _sharegpt_turn(pair[name][0]) for name in ("chosen", "rejected")}
        rows.append({"conversations": [_sharegpt_turn(m) for m in turns], **answers, **columns})
        rows[-1].update(_images(folder, images, indexes))
    return _write(folder / "sharegpt_preference.json", rows)


def write_alpaca(folder: Path, images: Sequence[str]) -> Path:
    """LLaMA-Factory alpaca SFT: ``instruction`` (+ ``input`` after a newline), ``output``, ``system``,
    ``history``."""
    return _write(
        folder / "alpaca.json",
        [_alpaca_row(folder, images, m[:-1], indexes, output=_text(m[-1])) for m, indexes in SFT_CONVERSATIONS],
    )


def write_alpaca_preference(folder: Path, images: Sequence[str]) -> Path:
    """LLaMA-Factory alpaca preference: ``instruction`` / ``input`` and ``chosen`` / ``rejected`` strings."""
    rows = [
        _alpaca_row(
            folder,
            images,
            pair["prompt"],
            indexes,
            chosen=_text(pair["chosen"][0]),
            rejected=_text(pair["rejected"][0]),
        )
        for pair, indexes in PREFERENCE_PAIRS
    ]
    return _write(folder / "alpaca_preference.json", rows)


def _alpaca_row(folder: Path, images: Sequence[str], prompt: list[Message], indexes: list[int], **answers: str) -> dict:
    columns, turns = _split_system(prompt)
    history, query = _history(turns)
    instruction, _, given = query.partition("\n")
    fields = {"instruction": instruction, "input": given}
    return {**fields, **answers, **columns, **history, **_images(folder, images, indexes)}


# -- ms-swift --------------------------------------------------------------------------------------------


def write_messages(folder: Path, images: Sequence[str]) -> Path:
    """ms-swift / LLaMA-Factory (mllm_demo) / OpenAI ``messages`` with string contents and ``<image>`` tags."""
    rows = [{"messages": _user_format(m), **_images(folder, images, indexes)} for m, indexes in SFT_CONVERSATIONS]
    return _write(folder / "messages.jsonl", rows)


def write_swift_sharegpt(folder: Path, images: Sequence[str]) -> Path:
    """ms-swift sharegpt SFT: ``conversation`` rounds ``{"human", "assistant"}`` and ``system``."""
    rows = []
    for messages, indexes in SFT_CONVERSATIONS:
        columns, turns = _split_system(messages)
        rounds = [{"human": _text(q), "assistant": _text(a)} for q, a in zip(turns[::2], turns[1::2], strict=True)]
        rows.append({**columns, "conversation": rounds, **_images(folder, images, indexes)})
    return _write(folder / "swift_sharegpt.jsonl", rows)


def write_swift_preference(folder: Path, images: Sequence[str]) -> Path:
    """ms-swift DPO: ``messages`` ending with the chosen answer, and ``rejected_response``."""
    rows = [
        {
            "messages": _user_format(pair["prompt"] + pair["chosen"]),
            "rejected_response": _text(pair["rejected"][0]),
            **_images(folder, images, indexes),
        }
        for pair, indexes in PREFERENCE_PAIRS
    ]
    return _write(folder / "swift_preference.jsonl", rows)


def write_swift_rejected_messages(folder: Path, images: Sequence[str]) -> Path:
    """ms-swift DPO with ``rejected_messages``: the same conversation ending with the rejected answer."""
    rows = _whole_conversations(folder, images, ("messages", "rejected_messages"), _user_format)
    return _write(folder / "swift_rejected_messages.jsonl", rows)


def _whole_conversations(
    folder: Path, images: Sequence[str], names: tuple[str, str], render: Callable[[list[Message]], list[Any]]
) -> list[dict[str, Any]]:
    """Preference rows as two whole conversations (prompt + chosen, prompt + rejected) in the fields ``names``."""
    return [
        {
            names[0]: render(pair["prompt"] + pair["chosen"]),
            names[1]: render(pair["prompt"] + pair["rejected"]),
            **_images(folder, images, indexes),
        }
        for pair, indexes in PREFERENCE_PAIRS
    ]


def write_swift_query(folder: Path, images: Sequence[str]) -> Path:
    """ms-swift query-response SFT: ``system``, ``query``, ``response``, ``history``."""
    rows = []
    for messages, indexes in SFT_CONVERSATIONS:
        columns, turns = _split_system(messages[:-1])
        history, query = _history(turns)
        rows.append({**columns, "query": query, "response": _text(messages[-1]), **history})
        rows[-1].update(_images(folder, images, indexes))
    return _write(folder / "swift_query.jsonl", rows)


def write_swift_query_preference(folder: Path, images: Sequence[str]) -> Path:
    """ms-swift query-response DPO: ``query``, ``response`` (the chosen answer), ``rejected_response``."""
    rows = []
    for pair, indexes in PREFERENCE_PAIRS:
        columns, turns = _split_system(pair["prompt"])
        history, query = _history(turns)
        answers = {"response": _text(pair["chosen"][0]), "rejected_response": _text(pair["rejected"][0])}
        rows.append({**columns, "query": query, **answers, **history, **_images(folder, images, indexes)})
    return _write(folder / "swift_query_preference.jsonl", rows)


# -- TRL -------------------------------------------------------------------------------------------------


def write_trl_messages(folder: Path, images: Sequence[str]) -> Path:
    """TRL conversational vision SFT: ``messages`` with content parts ``{"type": "image"}`` / ``{"type": "text"}``."""
    rows = [{"messages": to_trl(m), **_images(folder, images, indexes)} for m, indexes in SFT_CONVERSATIONS]
    return _write(folder / "trl_messages.jsonl", rows)


def write_trl_preference(folder: Path, images: Sequence[str]) -> Path:
    """TRL vision DPO, explicit prompt: ``prompt`` / ``chosen`` / ``rejected`` as conversations of content parts."""
    rows = [
        {**{name: to_trl(messages) for name, messages in pair.items()}, **_images(folder, images, indexes)}
        for pair, indexes in PREFERENCE_PAIRS
    ]
    return _write(folder / "trl_preference.jsonl", rows)


def write_trl_implicit_preference(folder: Path, images: Sequence[str]) -> Path:
    """TRL DPO, implicit prompt: ``chosen`` / ``rejected`` whole conversations sharing the prompt turns."""
    rows = _whole_conversations(folder, images, ("chosen", "rejected"), to_trl)
    return _write(folder / "trl_implicit_preference.jsonl", rows)


def write_trl_prompt_completion(folder: Path, images: Sequence[str]) -> Path:
    """TRL conversational prompt-completion SFT: ``prompt`` (every turn before the last answer) and ``completion``."""
    rows = [
        {"prompt": to_trl(m[:-1]), "completion": to_trl(m[-1:]), **_images(folder, images, indexes)}
        for m, indexes in SFT_CONVERSATIONS
    ]
    return _write(folder / "trl_prompt_completion.jsonl", rows)


def write_trl_prompt(folder: Path, images: Sequence[str]) -> Path:
    """TRL conversational prompt-only (GRPO): ``prompt``."""
    rows = [
        {"prompt": to_trl(pair["prompt"]), **_images(folder, images, indexes)} for pair, indexes in PREFERENCE_PAIRS
    ]
    return _write(folder / "trl_prompt.jsonl", rows)


@dataclass(frozen=True)
class FormatFixture:
    """A writer, the format its file is in, and the kind of rows it holds (``sft``, ``preference``, ``prompt``)."""

    write: Callable[[Path, Sequence[str]], Path]
    format: str
    kind: str


FIXTURES: dict[str, FormatFixture] = {
    "sharegpt": FormatFixture(write_sharegpt, "sharegpt", "sft"),
    "sharegpt_preference": FormatFixture(write_sharegpt_preference, "sharegpt_preference", "preference"),
    "alpaca": FormatFixture(write_alpaca, "alpaca", "sft"),
    "alpaca_preference": FormatFixture(write_alpaca_preference, "alpaca", "preference"),
    "messages": FormatFixture(write_messages, "messages", "sft"),
    "swift_sharegpt": FormatFixture(write_swift_sharegpt, "swift_sharegpt", "sft"),
    "swift_preference": FormatFixture(write_swift_preference, "swift_preference", "preference"),
    "swift_rejected_messages": FormatFixture(write_swift_rejected_messages, "swift_preference", "preference"),
    "swift_query": FormatFixture(write_swift_query, "swift_query", "sft"),
    "swift_query_preference": FormatFixture(write_swift_query_preference, "swift_query", "preference"),
    "trl_messages": FormatFixture(write_trl_messages, "messages", "sft"),
    "trl_preference": FormatFixture(write_trl_preference, "trl_preference", "preference"),
    "trl_implicit_preference": FormatFixture(write_trl_implicit_preference, "trl_implicit_preference", "preference"),
    "trl_prompt_completion": FormatFixture(write_trl_prompt_completion, "trl_prompt_completion", "sft"),
    "trl_prompt": FormatFixture(write_trl_prompt, "trl_prompt", "prompt"),
}
