"""Read SFT and preference data files into one canonical, validated ``datasets.Dataset``.

Input files are JSON Lines (``.jsonl``: one object per line, blank lines allowed) or JSON (``.json``:
a list of objects). Image paths are resolved relative to the data file's folder. Accepted rows:

- SFT, LLaVA style: ``{"image": "a.png" | "images": [...], "conversations": [{"from": "human" | "gpt" |
  "system", "value": "<image>\\nWhat is it?"}, ...], "id": ...}``
- SFT, chat style: ``{"images": [...], "messages": [{"role": "system" | "user" | "assistant", "content": str
  | [{"type": "image"}, {"type": "text", "text": "..."}]}, ...]}``
- preference (DPO, RM): ``{"images": [...], "prompt": str | [messages ending with a user turn],
  "chosen": str | [assistant messages], "rejected": str | [assistant messages]}``, optionally ``"margin"``: a
  number, how far the reward model's chosen reward should exceed the rejected one (reward modelling only)
- prompt (generation): a preference row's ``"prompt"`` (other fields such as ``chosen`` are ignored), or an SFT
  row (``"conversations"`` / ``"messages"``) whose trailing assistant turns are dropped; with optional
  ``"image"`` / ``"images"`` and ``"id"``. What is left must end with a user turn.

Canonical rows (what the collators consume), one per input row::

    sft:        {"messages": [Message], "images": [str], "source": "FILE:LINE"}
    preference: {"prompt": [Message], "chosen": [Message], "rejected": [Message], "images": [str],
                 "source": "FILE:LINE", "margin": float (only where the row gives one)}
    prompt:     {"prompt": [Message], "images": [str], "source": "FILE:LINE", "id": JSON text of the row's "id"
                 or None}
    Message = {"role": "system" | "user" | "assistant", "content": [Part]}
    Part    = {"type": "image", "text": None} | {"type": "text", "text": str}

``images`` are absolute paths, in the order of the image parts (across prompt, then chosen, then rejected).
Every text is split at the image placeholder (``"<image>"``, plus one newline right after it); a row whose
messages hold no image part gets all its images at the start of its first user message (LLaVA convention).
Image parts appear only in user messages. Every problem is reported as ``FILE:LINE: message``, all rows
of a file at once, in one :class:`DataError`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets

from resonance.data.images import (
    ANY_IMAGE_COUNT,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageCount,
    check_pixel_budget,
    image_problem,
)
from resonance.errors import DataError

logger = logging.getLogger("resonance.data")

Kind = Literal["sft", "preference", "prompt"]
Part = dict[str, str | None]
Message = dict[str, Any]
_Columns = dict[str, list[Message]]

KINDS: tuple[str, ...] = ("sft", "preference", "prompt")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".json")

_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_CHAT_ROLES = ("system", "user", "assistant")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# Known top-level fields, in groups of alternatives; a row needs one member of each required group.
_IMAGE_FIELDS = ("image", "images")
_SFT_GROUPS: tuple[tuple[str, ...], ...] = (("conversations", "messages"), _IMAGE_FIELDS)
_PREFERENCE_GROUPS: tuple[tuple[str, ...], ...] = (("prompt",), ("chosen",), ("rejected",), _IMAGE_FIELDS)
# Prompt rows may come from preference files (their answers are ignored) or SFT files (the answer is dropped).
_PROMPT_GROUPS: tuple[tuple[str, ...], ...] = (("prompt", "conversations", "messages"), _IMAGE_FIELDS)
_PROMPT_IGNORED_FIELDS = ("chosen", "rejected")
_OPTIONAL_FIELDS = ("id",)
_SFT_FORMATS = (
    'SFT rows are LLaVA style {"conversations": [{"from": "human" | "gpt" | "system", "value": str}]} '
    'or chat style {"messages": [{"role": "system" | "user" | "assistant", "content": str | [parts]}]}, '
    'with optional "image" / "images"'
)
_PREFERENCE_FORMAT = (
    'preference rows are {"prompt": str | [messages], "chosen": str | [assistant messages], '
    '"rejected": str | [assistant messages]}, with optional "image" / "images"'
)
_PROMPT_FORMAT = (
    'prompt rows are {"prompt": str | [messages ending with a user turn]} or SFT rows ("conversations" / '
    '"messages", a trailing assistant turn is dropped), with optional "image" / "images" and "id"'
)


def features_for(kind: Kind, margin: bool = False) -> datasets.Features:
    """The arrow schema of canonical rows of ``kind`` (the same for text-only and image rows); ``margin``: with
    the preference rows' optional ``margin`` column."""
    _check_kind(kind)

    def messages() -> datasets.List:
        part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
        return datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)})

    columns: dict[str, Any] = (
        {"messages": messages()}
        if kind == "sft"
        else {"prompt": messages()}
        if kind == "prompt"
        else {"prompt": messages(), "chosen": messages(), "rejected": messages()}
    )
    columns["images"] = datasets.List(datasets.Value("string"))
    columns["source"] = datasets.Value("string")
    if kind == "prompt":
        columns["id"] = datasets.Value("string")  # the row's "id" as JSON text (any JSON type), or None
    if margin and kind == "preference":
        columns["margin"] = datasets.Value("float64")
    return datasets.Features(columns)


def image_part() -> Part:
    """A canonical image part."""
    return {"type": "image", "text": None}


def text_part(text: str) -> Part:
    """A canonical text part."""
    return {"type": "text", "text": text}


def text_to_parts(text: str, image_placeholder: str = "<image>") -> list[Part]:
    """Split ``text`` at each placeholder into text and image parts.

    One newline right after a placeholder is swallowed; empty text parts are dropped.
    """
    parts: list[Part] = []
    for i, piece in enumerate(text.split(image_placeholder)):
        if i > 0:
            parts.append(image_part())
            piece = piece[2:] if piece.startswith("\r\n") else piece[1:] if piece.startswith("\n") else piece
        if piece:
            parts.append(text_part(piece))
    return parts


@dataclass(frozen=True)
class LoadedRows:
    """Canonical rows of one file, plus what ``skip_invalid`` dropped.

    ``skipped`` is the number of dropped rows, ``problems`` their ``(source, message)`` pairs.
    """

    path: str
    kind: Kind
    rows: list[dict[str, Any]]
    skipped: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def summary(self) -> str:
        """``"N <kind> rows from <path>; K invalid rows skipped"``."""
        return f"{len(self.rows)} {self.kind} rows from {self.path}; {self.skipped} invalid rows skipped"

    def to_dataset(self) -> datasets.Dataset:
        """The rows as a ``datasets.Dataset`` with :func:`features_for` schema; ``info.description`` is
        :attr:`summary`. Where some preference rows give a ``margin``, the others get 0."""
        margin = self.kind == "preference" and any("margin" in row for row in self.rows)
        features = features_for(self.kind, margin=margin)
        info = datasets.DatasetInfo(description=self.summary, features=features)
        rows = [{**row, "margin": row.get("margin", 0.0)} for row in self.rows] if margin else self.rows
        return datasets.Dataset.from_list(rows, info=info)


def load_rows(
    path: str | os.PathLike[str],
    kind: Kind,
    *,
    image_placeholder: str = "<image>",
    skip_invalid: bool = False,
    check_images: bool = True,
    image_count: ImageCount = ANY_IMAGE_COUNT,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> datasets.Dataset:
    """Load, validate and canonicalise a data file into a ``datasets.Dataset``.

    Raises :class:`DataError` listing every problem of the file, unless ``skip_invalid``: then invalid rows
    are dropped with one warning each (logger ``resonance.data.rows``) and a summary, and the returned dataset's
    ``info.description`` reads ``"N <kind> rows from <path>; K invalid rows skipped"`` (use
    :func:`read_rows` for the count and problems as data). A file without valid rows is always an error.
    ``check_images`` opens every image with PIL and ``verify()``s it, and refuses one over ``max_image_pixels``
    (``--max_image_pixels``, read from the header, nothing decoded; 0: no limit); ``False`` skips all file checks.
    ``image_count``: the images a conversation may have, as the model family takes them
    (spec image.required and image.multi_image); a row outside them is invalid.
    """
    return read_rows(
        path,
        kind,
        image_placeholder=image_placeholder,
        skip_invalid=skip_invalid,
        check_images=check_images,
        image_count=image_count,
        max_image_pixels=max_image_pixels,
    ).to_dataset()


def read_rows(
    path: str | os.PathLike[str],
    kind: Kind,
    *,
    image_placeholder: str = "<image>",
    skip_invalid: bool = False,
    check_images: bool = True,
    image_count: ImageCount = ANY_IMAGE_COUNT,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> LoadedRows:
    """Like :func:`load_rows`, but return the canonical rows as a list with the skip count and problems."""
    _check_kind(kind)
    _check_placeholder(image_placeholder)
    check_pixel_budget(max_image_pixels)
    display = os.fspath(path)
    file = Path(path)
    if not file.exists():
        raise DataError([(display, "file not found")])
    if not file.is_file():
        raise DataError([(display, "not a file; expected a .jsonl or .json data file")])
    suffix = file.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        found = repr(suffix) if suffix else "no extension"
        expected = "expected .jsonl (one JSON object per line) or .json (a JSON list of objects)"
        raise DataError([(display, f"unsupported file type ({found}); {expected}")])
    raw_rows = _read_jsonl(file) if suffix == ".jsonl" else _read_json_list(file, display)
    converter = _RowConverter(Path(os.path.abspath(file)).parent, image_placeholder, check_images, max_image_pixels)
    converter.image_count = image_count

    rows: list[dict[str, Any]] = []
    invalid: list[tuple[str, list[str]]] = []
    for raw in raw_rows:
        source = f"{display}:{raw.line}"
        problems = [raw.error] if raw.error else []
        row = None if raw.error else converter.convert(raw.value, kind, source, problems)
        if problems:
            invalid.append((source, problems))
        else:
            assert row is not None
            rows.append(row)

    errors = [(source, message) for source, problems in invalid for message in problems]
    total = len(rows) + len(invalid)
    if total == 0:
        raise DataError([(display, "no rows: the file holds no data")])
    if not rows:
        raise DataError(errors, header=f"{display}: no valid rows ({total} rows, all invalid)")
    if invalid and not skip_invalid:
        raise DataError(
            errors,
            header=(
                f"{display}: {len(errors)} problem(s) in {len(invalid)} of {total} rows"
                " (fix them, or pass --skip_invalid_rows to drop those rows)"
            ),
        )
    for source, problems in invalid:
        logger.warning("skipping invalid row %s: %s", source, "; ".join(problems))
    if invalid:
        logger.warning("skipped %d invalid of %d rows in %s", len(invalid), total, display)
    return LoadedRows(display, kind, rows, skipped=len(invalid), problems=errors)


def convert_row(
    row: Any,
    kind: Kind,
    *,
    base_dir: str | os.PathLike[str] = ".",
    image_placeholder: str = "<image>",
    check_images: bool = True,
    source: str = "<row>",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Canonicalise one raw row, images relative to ``base_dir``; raise :class:`DataError` if invalid."""
    _check_kind(kind)
    _check_placeholder(image_placeholder)
    check_pixel_budget(max_image_pixels)
    problems: list[str] = []
    base = Path(os.path.abspath(base_dir))
    converted = _RowConverter(base, image_placeholder, check_images, max_image_pixels).convert(
        row, kind, source, problems
    )
    if problems or converted is None:
        raise DataError([(source, message) for message in problems])
    return converted


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _RawRow:
    line: int
    value: Any = None
    error: str | None = None


class _JsonDecoder:
    """``json`` decoding that records duplicate keys instead of letting the last one win silently."""

    def __init__(self) -> None:
        self.duplicates: list[str] = []
        self.decoder = json.JSONDecoder(object_pairs_hook=self._object)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                self.duplicates.append(key)
            obj[key] = value
        return obj

    def row(self, line: int, value: Any) -> _RawRow:
        """Wrap a decoded value, turning duplicate keys found while decoding it into a row error."""
        duplicates, self.duplicates = self.duplicates, []
        if duplicates:
            keys = ", ".join(repr(k) for k in dict.fromkeys(duplicates))
            return _RawRow(line, error=f"duplicate key(s) {keys} in one object; JSON keeps only the last")
        return _RawRow(line, value)


def _read_jsonl(file: Path) -> Iterator[_RawRow]:
    decoder = _JsonDecoder()
    for index, raw_line in enumerate(file.read_bytes().split(b"\n")):
        line = index + 1
        try:
            text = raw_line.decode("utf-8-sig" if index == 0 else "utf-8")
        except UnicodeDecodeError as exc:
            yield _RawRow(line, error=f"not valid UTF-8 (byte {exc.start + 1} of the line)")
            continue
        if not text.strip():
            continue
        try:
            value = decoder.decoder.decode(text)
        except json.JSONDecodeError as exc:
            decoder.duplicates = []
            yield _RawRow(line, error=f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        yield decoder.row(line, value)


def _read_json_list(file: Path, display: str) -> list[_RawRow]:
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError([(f"{display}:{line}", "not valid UTF-8")]) from None
    decoder = _JsonDecoder()
    rows: list[_RawRow] = []
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def fail(pos: int, message: str) -> DataError:
        return DataError([(f"{display}:{line_at(pos)}", message)])

    pos = _skip_space(text, 0)
    if pos == len(text):
        raise fail(pos, "empty file; expected a JSON list of row objects")
    if text[pos] != "[":
        raise fail(pos, "expected a JSON list of row objects ('[' ...); for one object per line use .jsonl")
    pos = _skip_space(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                message = f"invalid JSON: {exc.msg} at column {exc.colno}"
                raise DataError([(f"{display}:{exc.lineno}", message)]) from None
            rows.append(decoder.row(line_at(pos), value))
            pos = _skip_space(text, end)
            if pos < len(text) and text[pos] == ",":
                pos = _skip_space(text, pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise fail(pos, "invalid JSON: expected ',' or ']' after a list item")
    if _skip_space(text, pos) != len(text):
        raise fail(_skip_space(text, pos), "invalid JSON: extra data after the list")
    return rows


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# ------------------------------------------------------------------------------------------ converting


class _RowConverter:
    """Turns raw rows into canonical rows, appending every problem found to a list of messages."""

    def __init__(self, base_dir: Path, placeholder: str, check_images: bool, max_image_pixels: int):
        self.base_dir = base_dir
        self.placeholder = placeholder
        self.check_images = check_images
        self.max_image_pixels = max_image_pixels
        self.image_count = ANY_IMAGE_COUNT  # images a conversation may have
        self._image_problems: dict[str, str | None] = {}

    def convert(self, obj: Any, kind: Kind, source: str, problems: list[str]) -> dict[str, Any] | None:
        """The canonical row, or ``None`` when ``problems`` grew."""
        if not isinstance(obj, dict):
            problems.append(f"a row must be a JSON object, got {_type_name(obj)}")
            return None
        before = len(problems)
        groups = {"sft": _SFT_GROUPS, "preference": _PREFERENCE_GROUPS, "prompt": _PROMPT_GROUPS}[kind]
        self._check_fields(obj, groups, problems)
        images = self._images(obj, problems)
        margin = self._margin(obj, problems) if kind == "preference" else None
        if kind == "sft":
            columns = self._sft_messages(obj, problems)
        elif kind == "prompt":
            columns = self._prompt_messages(obj, problems)
        else:
            columns = self._preference_messages(obj, problems)
        if columns is None or images is None or len(problems) > before:
            return None
        fields = ("conversations", "messages") if kind == "sft" else ("prompt", "conversations", "messages")
        given = next(name for name in fields if name in obj)  # the field the conversation (or prompt) came from
        self._check_turn_order(given, next(iter(columns.values())), problems)
        count_problem = self.image_count.problem(len(images))
        if count_problem is not None:
            problems.append(count_problem)
            return None
        self._place_images(columns, len(images), problems)
        for column, messages in columns.items():
            name = "conversations" if column == "messages" and "conversations" in obj else column
            for i, message in enumerate(messages):
                if _is_empty(message["content"]):
                    problems.append(f"{name}[{i}]: empty {message['role']} turn; write its text")
        if len(problems) > before:
            return None
        if kind == "prompt":
            row_id = json.dumps(obj["id"]) if "id" in obj else None
            return {**columns, "images": images, "source": source, "id": row_id}
        if margin is not None:
            return {**columns, "images": images, "source": source, "margin": margin}
        return {**columns, "images": images, "source": source}

    @staticmethod
    def _margin(obj: dict[str, Any], problems: list[str]) -> float | None:
        """A preference row's optional ``margin``: a finite number, or ``None`` when absent or invalid."""
        if "margin" not in obj:
            return None
        value = obj["margin"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(
                f"margin: must be a number (how far the chosen reward should exceed the rejected one), got {value!r}"
            )
            return None
        return float(value)

    # ------------------------------------------------------------------------------------- fields

    def _check_fields(self, obj: dict[str, Any], groups: tuple[tuple[str, ...], ...], problems: list[str]):
        """Flag unknown fields that are probably a misspelled known field or an unread image path."""
        known = {name for group in groups for name in group} | set(_OPTIONAL_FIELDS)
        if groups is _PROMPT_GROUPS:
            known |= set(_PROMPT_IGNORED_FIELDS)
        absent = [name for group in groups if not any(name in obj for name in group) for name in group]
        has_images = "image" in obj or "images" in obj
        for key in obj:
            if key in known:
                continue
            match = difflib.get_close_matches(key, absent, n=1, cutoff=0.8)
            if match:
                problems.append(f"unknown field {key!r}; did you mean {match[0]!r}?")
            elif not has_images and _looks_like_image_paths(obj[key]):
                problems.append(
                    f"field {key!r} holds image path(s) but only 'image' / 'images' are read;"
                    " rename it, or the row would train without its image"
                )

    def _images(self, obj: dict[str, Any], problems: list[str]) -> list[str] | None:
        if "image" in obj and "images" in obj:
            problems.append("has both 'image' and 'images'; keep one")
            return None
        name = "images" if "images" in obj else "image"
        value = obj.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            entries = [(name, value)]
        elif isinstance(value, list):
            entries = [(f"{name}[{i}]", item) for i, item in enumerate(value)]
        else:
            problems.append(f"{name}: must be an image path or a list of paths, got {_type_name(value)}")
            return None
        paths: list[str] = []
        before = len(problems)
        for where, item in entries:
            if not isinstance(item, str) or not item.strip():
                problems.append(f"{where}: must be a non-empty image path string, got {item!r}")
                continue
            given = os.path.expanduser(item)
            base = self.base_dir
            path = os.path.abspath(os.path.join(self.base_dir, given))
            paths.append(path)
            problem = self._image_problem(path) if self.check_images else None
            if problem:
                missing = not os.path.isabs(given) and not os.path.isfile(path)
                hint = f" (relative to the data file's folder {base})" if missing else ""
                problems.append(f"{where}: {problem}{hint}")
        return None if len(problems) > before else paths

    def _image_problem(self, path: str) -> str | None:
        if path not in self._image_problems:
            self._image_problems[path] = _open_problem(path, self.max_image_pixels)
        return self._image_problems[path]

    # ----------------------------------------------------------------------------------- messages

    def _sft_messages(self, obj: dict[str, Any], problems: list[str]) -> _Columns | None:
        if "conversations" in obj and "messages" in obj:
            problems.append("has both 'conversations' (LLaVA style) and 'messages' (chat style); keep one")
            return None
        if "conversations" not in obj and "messages" not in obj:
            found = _keys(obj)
            hint = "; this looks like a preference row (for `resonance train dpo` or `rm`)" if "chosen" in obj else ""
            problems.append(f"missing field 'conversations' or 'messages' (found {found}); {_SFT_FORMATS}{hint}")
            return None
        name = "conversations" if "conversations" in obj else "messages"
        messages = self._messages(obj[name], name, llava=name == "conversations", problems=problems)
        if messages is None:
            return None
        if not any(m["role"] == "assistant" for m in messages):
            turn = "'gpt'" if name == "conversations" else "'assistant'"
            problems.append(f"{name}: no {turn} turn; SFT needs at least one answer to learn from")
        self._check_image_roles(name, messages, problems)
        return {"messages": messages}

    def _preference_messages(self, obj: dict[str, Any], problems: list[str]) -> _Columns | None:
        missing = [name for name in ("prompt", "chosen", "rejected") if name not in obj]
        if missing:
            fields = ", ".join(repr(name) for name in missing)
            sft = "messages" in obj or "conversations" in obj
            hint = "; this looks like an SFT row (for `resonance train sft`)" if sft else ""
            problems.append(f"missing field(s) {fields} (found {_keys(obj)}); {_PREFERENCE_FORMAT}{hint}")
            return None
        columns: dict[str, list[Message]] = {}
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        messages = self._messages(prompt, "prompt", llava=False, problems=problems)
        if messages is not None:
            if messages[-1]["role"] != "user":
                problems.append(
                    f"prompt: the last message must be a user turn (the one chosen/rejected answer),"
                    f" got {messages[-1]['role']!r}"
                )
            self._check_image_roles("prompt", messages, problems)
            columns["prompt"] = messages
        for name in ("chosen", "rejected"):
            value = obj[name]
            if value == [] or (isinstance(value, str) and not value.strip()):
                problems.append(f"{name}: is empty; write the answer")
                continue
            if isinstance(value, str):
                value = [{"role": "assistant", "content": value}]
            messages = self._messages(value, name, llava=False, problems=problems)
            if messages is None:
                continue
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    problems.append(
                        f"{name}[{i}].role: must be 'assistant' ({name} holds only the answer), got {message['role']!r}"
                    )
            self._check_image_roles(name, messages, problems)
            columns[name] = messages
        return columns if len(columns) == 3 else None

    def _prompt_messages(self, obj: dict[str, Any], problems: list[str]) -> _Columns | None:
        """A prompt to generate from: a preference row's prompt, or an SFT conversation less its trailing answer."""
        given = [name for name in ("prompt", "conversations", "messages") if name in obj]
        if len(given) > 1:
            fields = " and ".join(repr(name) for name in given)
            problems.append(f"has both {fields}; keep one (the prompt to generate from)")
            return None
        if not given:
            found = _keys(obj)
            problems.append(f"missing field 'prompt', 'conversations' or 'messages' (found {found}); {_PROMPT_FORMAT}")
            return None
        name = given[0]
        value = obj[name]
        if name == "prompt" and isinstance(value, str):
            value = [{"role": "user", "content": value}]
        messages = self._messages(value, name, llava=name == "conversations", problems=problems)
        if messages is None:
            return None
        self._check_image_roles(name, messages, problems)
        while name != "prompt" and messages and messages[-1]["role"] == "assistant":
            messages.pop()  # the SFT row's answer: the model is to write it
        if not messages or messages[-1]["role"] != "user":
            last = repr(messages[-1]["role"]) if messages else "nothing (only assistant turns)"
            problems.append(f"{name}: the prompt must end with a user turn (the one to answer), got {last}")
            return None
        return {"prompt": messages}

    def _messages(self, value: Any, name: str, *, llava: bool, problems: list[str]) -> list[Message] | None:
        role_key, content_key = ("from", "value") if llava else ("role", "content")
        roles = tuple(_LLAVA_ROLES) if llava else _CHAT_ROLES
        if not isinstance(value, list):
            problems.append(f"{name}: must be a list of messages, got {_type_name(value)}")
            return None
        if not value:
            problems.append(f"{name}: empty conversation; it needs at least one message")
            return None
        before = len(problems)
        messages: list[Message] = []
        for i, turn in enumerate(value):
            where = f"{name}[{i}]"
            if not isinstance(turn, dict):
                problems.append(f"{where}: a message must be an object with {role_key!r} and {content_key!r}")
                continue
            missing = [key for key in (role_key, content_key) if key not in turn]
            if missing:
                style = "LLaVA style" if llava else "chat style"
                fields = " and ".join(repr(key) for key in missing)
                expected = f"{style} messages have {role_key!r} and {content_key!r}"
                problems.append(f"{where}: missing {fields} ({expected})")
                continue
            role = turn[role_key]
            if role not in roles:
                expected = ", ".join(repr(r) for r in roles)
                problems.append(f"{where}.{role_key}: unknown value {role!r}; expected one of {expected}")
                continue
            content = self._content(turn[content_key], f"{where}.{content_key}", problems)
            if content is not None:
                messages.append({"role": _LLAVA_ROLES[role] if llava else role, "content": content})
        return None if len(problems) > before else messages

    def _content(self, content: Any, where: str, problems: list[str]) -> list[Part] | None:
        if isinstance(content, str):
            return text_to_parts(content, self.placeholder)
        if not isinstance(content, list):
            problems.append(f"{where}: must be a string or a list of parts, got {_type_name(content)}")
            return None
        parts: list[Part] = []
        before = len(problems)
        for j, part in enumerate(content):
            at = f"{where}[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.extend(text_to_parts(part["text"], self.placeholder))
            elif kind == "text":
                problems.append(f"{at}.text: must be a string, got {_type_name(part.get('text'))}")
            elif kind == "image":
                inline = sorted(k for k in part if k not in ("type", "text"))
                if inline or part.get("text") is not None:
                    problems.append(
                        f"{at}: image parts carry no data here (found {', '.join(inline) or 'text'});"
                        ' list the files in the row\'s "images" and write {"type": "image"}'
                    )
                parts.append(image_part())
            else:
                problems.append(
                    f'{at}: a part must be {{"type": "text", "text": str}} or {{"type": "image"}}, got {part!r}'
                )
        return None if len(problems) > before else parts

    @staticmethod
    def _check_turn_order(name: str, messages: list[Message], problems: list[str]) -> None:
        """The first assistant turn must answer a user turn: no chat template renders an answer to nothing."""
        for i, message in enumerate(messages):
            if message["role"] == "user":
                return
            if message["role"] == "assistant":
                assistant, user = ("'gpt'", "'human'") if name == "conversations" else ("'assistant'", "'user'")
                problems.append(
                    f"{name}[{i}]: {assistant} turn before any {user} turn; a conversation starts with the user's"
                    " turn (after an optional 'system' turn)"
                )
                return

    def _check_image_roles(self, name: str, messages: list[Message], problems: list[str]) -> None:
        for i, message in enumerate(messages):
            if message["role"] != "user" and any(p["type"] == "image" for p in message["content"]):
                where = f"{name}[{i}]: image ({self.placeholder!r} or an image part)"
                role = _article(message["role"])
                problems.append(f"{where} in {role} message; images may only appear in user messages")

    def _place_images(self, columns: dict[str, list[Message]], n_images: int, problems: list[str]) -> None:
        """Check that image parts match the images one to one, or prepend them all to the first user turn."""
        count = sum(p["type"] == "image" for ms in columns.values() for m in ms for p in m["content"])
        if count == 0 and n_images:
            first = next(iter(columns.values()))
            user = next((m for m in first if m["role"] == "user"), None)
            if user is None:
                problems.append(f"the row has {n_images} image(s) but no user message to put them in")
                return
            user["content"] = [image_part() for _ in range(n_images)] + user["content"]
        elif count != n_images:
            problems.append(
                f"{count} image placeholder(s) ({self.placeholder!r} or image parts) but {n_images} image(s)"
                " in 'image' / 'images'; they must match one to one (or use no placeholder at all to put"
                " every image at the start of the first user message)"
            )


# -------------------------------------------------------------------------------------------- helpers


def _open_problem(path: str, max_pixels: int) -> str | None:
    """Why ``path`` is not a readable image within the pixel budget (no pixel decoding), or ``None``."""
    if not os.path.exists(path):
        return f"image file not found: {path}"
    if not os.path.isfile(path):
        return f"not a file: {path}"
    return image_problem(path, max_pixels)


def _is_empty(parts: list[Part]) -> bool:
    return all(p["type"] == "text" and not (p["text"] or "").strip() for p in parts)


def _looks_like_image_paths(value: Any) -> bool:
    values = value if isinstance(value, list) and value else [value]
    return all(isinstance(v, str) and v.lower().endswith(_IMAGE_SUFFIXES) for v in values)


def _keys(obj: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in obj) or "no fields"


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(repr(k) for k in KINDS)}, got {kind!r}")


def _check_placeholder(image_placeholder: str) -> None:
    if not isinstance(image_placeholder, str) or not image_placeholder:
        raise ValueError(f"image_placeholder must be a non-empty string, got {image_placeholder!r}")


def _article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"
