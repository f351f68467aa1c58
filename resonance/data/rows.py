"""Read data sources into one canonical, validated ``datasets.Dataset`` per file: SFT, preference and prompt rows.

Rows come from :mod:`resonance.data.sources` (JSON Lines, JSON lists, parquet, arrow, csv, ``save_to_disk``
folders, dataset names); each row's format (LLaVA/sharegpt, chat ``messages``, TRL's preference and
prompt-completion formats, ms-swift's, alpaca, ...) is recognised from its fields and converted to a NATIVE shape
by :mod:`resonance.data.formats`; this module validates the native shape and canonicalises it:

- SFT, LLaVA/sharegpt style: ``{"image": ref | "images": [...], "conversations": [{"from": "human" | "gpt" |
  "system" (or "user" | "assistant"), "value": "<image>\\nWhat is it?"}, ...], "id": ...}``
- SFT, chat style: ``{"images": [...], "messages": [{"role": "system" | "user" | "assistant", "content": str
  | [parts]}, ...]}``; a part is ``{"type": "text", "text": ...}``, ``{"type": "image"}`` (its image in the row's
  ``images``), ``{"type": "image", "image" | "path" | "url": ref}`` or ``{"type": "image_url", "image_url":
  {"url": ref}}`` (the image given in the part). A message may say ``"loss": false`` (ms-swift), ``"training":
  false`` or ``"weight": 0`` (axolotl): that assistant turn is context, not supervised.
- preference (DPO, RM): ``{"images": [...], "prompt": str | [messages ending with a user turn],
  "chosen": str | [assistant messages], "rejected": str | [assistant messages]}``, optionally ``"margin"``: a
  number, how far the reward model's chosen reward should exceed the rejected one (reward modelling only)
- prompt (generation): a preference row's ``"prompt"``, or an SFT conversation whose trailing assistant turns are
  dropped; with optional ``"image"`` / ``"images"`` and ``"id"``. What is left must end with a user turn.

An image reference is a path (relative to the data file's folder or ``--image_root``), a ``file://``, ``data:`` or
(with ``--allow_image_urls``) http(s) URL, image bytes, a ``{"bytes", "path"}`` struct or a PIL image
(:func:`resonance.data.images.resolve_image`). Every format may hold videos: ``video`` (one) / ``videos`` fields,
``<video>`` placeholders, ``{"type": "video"}`` / ``video_url`` parts; a video is a file or a list of frame images
(:func:`resonance.data.videos.resolve_video`); a family (or algorithm) that takes no video refuses such a row by
name. An audio (``audio(s)`` fields, ``<audio>`` placeholders, audio parts) is refused by row, never dropped. A
field no canonical row keeps is counted and reported once per source.

Canonical rows (what the collators consume), one per input row::

    sft:        {"messages": [Message], "images": [str], "source": "FILE:LINE" | "FILE:row N"}
    preference: {"prompt": [Message], "chosen": [Message], "rejected": [Message], "images": [str],
                 "source": ..., "margin": float (only where the row gives one)}
    prompt:     {"prompt": [Message], "images": [str], "source": ..., "id": JSON text of the row's "id" or None}
    Message = {"role": "system" | "user" | "assistant", "content": [Part], "train": False (only where given)}
    Part    = {"type": "image", "text": None} | {"type": "video", "text": None} | {"type": "text", "text": str}

A row holding videos also has ``"videos": [{"path": str | None, "frames": [str]}]`` (a file, or its frames), in the
order of its video parts; in a dataset where some rows have videos, the others get ``[]``.

``images`` are absolute paths, in the order of the image parts (across prompt, then chosen, then rejected).
Every text is split at the image placeholder (``"<image>"``, plus one newline right after it); a row whose
messages hold no image part gets all its images at the start of its first user message (LLaVA convention).
Image parts appear only in user messages. Every problem is reported as ``SOURCE: message``, all rows of a source
at once, in one :class:`DataError`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets

from resonance.data.formats import DataFormat, detect_format, format_hint, format_named, json_type
from resonance.data.images import (
    ANY_IMAGE_COUNT,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageCount,
    ImageRefError,
    ImageSources,
    check_pixel_budget,
    image_problem,
    resolve_image,
)
from resonance.data.sources import DatasetChoice, open_rows
from resonance.data.videos import resolve_video, video_problem
from resonance.errors import ConfigError, DataError

logger = logging.getLogger("resonance.data")

Kind = Literal["sft", "preference", "prompt"]
Part = dict[str, str | None]
Message = dict[str, Any]
_Columns = dict[str, list[Message]]

KINDS: tuple[str, ...] = ("sft", "preference", "prompt")

_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_CHAT_ROLES = ("system", "user", "assistant")
_MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# A modality no family takes yet: refused by name wherever a row holds it.
_MEDIA_FIELDS = ("audio", "audios")
_MEDIA_PARTS = {"audio": "audio", "audio_url": "audio", "input_audio": "audio"}
_VIDEO_FIELDS = ("video", "videos")
_VIDEO_PARTS = ("video", "video_url")
# A message's own say on whether it is supervised: ms-swift's "loss", axolotl's "training" and "weight".
_TURN_LOSS_KEYS = ("loss", "training", "weight")
# Known top-level fields, in groups of alternatives; a row needs one member of each required group.
_IMAGE_FIELDS = ("image", "images")
_SFT_GROUPS: tuple[tuple[str, ...], ...] = (("conversations", "messages"), _IMAGE_FIELDS)
_PREFERENCE_GROUPS: tuple[tuple[str, ...], ...] = (("prompt",), ("chosen",), ("rejected",), _IMAGE_FIELDS)
# Prompt rows may come from preference files (their answers are unused) or SFT files (the answer is dropped).
_PROMPT_GROUPS: tuple[tuple[str, ...], ...] = (("prompt", "conversations", "messages"), _IMAGE_FIELDS)
_OPTIONAL_FIELDS = ("id",)
# The spellings Resonance has always read side by side in one file (its own format before other tools' formats came
# in): they may share a source; any other format must be the only one of its source.
_ONE_FORMAT = dict.fromkeys(("sharegpt", "messages", "trl_preference", "trl_prompt"), "resonance")
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


def features_for(kind: Kind, margin: bool = False, train: bool = False, videos: bool = False) -> datasets.Features:
    """The arrow schema of canonical rows of ``kind`` (the same for text-only and image rows); ``margin``: with
    the preference rows' optional ``margin`` column; ``train``: with the messages' optional ``train`` key;
    ``videos``: with the ``videos`` column (each video ``{"path": file or None, "frames": [frame files]}``)."""
    _check_kind(kind)

    def messages() -> datasets.List:
        part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
        message = {"role": datasets.Value("string"), "content": datasets.List(part)}
        if train:
            message["train"] = datasets.Value("bool")
        return datasets.List(message)

    columns: dict[str, Any] = (
        {"messages": messages()}
        if kind == "sft"
        else {"prompt": messages()}
        if kind == "prompt"
        else {"prompt": messages(), "chosen": messages(), "rejected": messages()}
    )
    columns["images"] = datasets.List(datasets.Value("string"))
    if videos:
        video = {"path": datasets.Value("string"), "frames": datasets.List(datasets.Value("string"))}
        columns["videos"] = datasets.List(video)
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


def video_part() -> Part:
    """A canonical video part."""
    return {"type": "video", "text": None}


def text_to_parts(text: str, image_placeholder: str = "<image>", video_placeholder: str | None = None) -> list[Part]:
    """Split ``text`` at each placeholder into text, image and video parts.

    One newline right after a placeholder is swallowed; empty text parts are dropped.
    """
    marks = {image_placeholder: image_part}
    if video_placeholder and video_placeholder != image_placeholder:
        marks[video_placeholder] = video_part
    pattern = "(" + "|".join(re.escape(mark) for mark in sorted(marks, key=len, reverse=True)) + ")"
    parts: list[Part] = []
    after_mark = False
    for piece in re.split(pattern, text):
        if piece in marks:
            parts.append(marks[piece]())
            after_mark = True
            continue
        if after_mark:
            piece = piece[2:] if piece.startswith("\r\n") else piece[1:] if piece.startswith("\n") else piece
        after_mark = False
        if piece:
            parts.append(text_part(piece))
    return parts


@dataclass(frozen=True)
class LoadedRows:
    """Canonical rows of one data source, plus what ``skip_invalid`` dropped and what the rows held that no
    canonical row keeps.

    ``skipped`` is the number of dropped rows, ``problems`` their ``(source, message)`` pairs; ``format`` the name
    of the rows' format (:mod:`resonance.data.formats`); ``unused`` each field no canonical row keeps, with the
    number of rows that have it (``messages[].name`` for a key of messages).
    """

    path: str
    kind: Kind
    rows: list[dict[str, Any]]
    skipped: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    format: str | None = None
    unused: dict[str, int] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """``"N <kind> rows from <path>; K invalid rows skipped"``."""
        return f"{len(self.rows)} {self.kind} rows from {self.path}; {self.skipped} invalid rows skipped"

    def to_dataset(self) -> datasets.Dataset:
        """The rows as a ``datasets.Dataset`` with :func:`features_for` schema; ``info.description`` is
        :attr:`summary`. Where some preference rows give a ``margin``, the others get 0."""
        margin = self.kind == "preference" and any("margin" in row for row in self.rows)
        columns = [row[name] for row in self.rows for name in _MESSAGE_COLUMNS if name in row]
        train = any("train" in message for messages in columns for message in messages)
        videos = any(row.get("videos") for row in self.rows)
        features = features_for(self.kind, margin=margin, train=train, videos=videos)
        info = datasets.DatasetInfo(description=self.summary, features=features)
        rows = [{**row, "margin": row.get("margin", 0.0)} for row in self.rows] if margin else self.rows
        rows = [{**row, "videos": row.get("videos", [])} for row in rows] if videos else rows
        return datasets.Dataset.from_list(rows, info=info)


def load_rows(path: str | os.PathLike[str], kind: Kind, **options: Any) -> datasets.Dataset:
    """Load, validate and canonicalise a data source into a ``datasets.Dataset``: :func:`read_rows`'s rows.

    Raises :class:`DataError` listing every problem of the source, unless ``skip_invalid``: then invalid rows
    are dropped with one warning each (logger ``resonance.data``) and a summary, and the returned dataset's
    ``info.description`` reads ``"N <kind> rows from <path>; K invalid rows skipped"`` (use :func:`read_rows` for
    the count and problems as data). A source without valid rows is always an error.
    """
    return read_rows(path, kind, **options).to_dataset()


def read_rows(
    path: str | os.PathLike[str],
    kind: Kind,
    *,
    image_placeholder: str = "<image>",
    video_placeholder: str = "<video>",
    skip_invalid: bool = False,
    check_images: bool = True,
    image_count: ImageCount = ANY_IMAGE_COUNT,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    data_format: str = "auto",
    image_root: str | os.PathLike[str] | None = None,
    allow_image_urls: bool = False,
    data_config: str | None = None,
    data_split: str | None = None,
    data_revision: str | None = None,
    allow_no_rows: bool = False,
) -> LoadedRows:
    """Read, validate and canonicalise the rows of ``path`` (:func:`resonance.data.sources.open_rows`: a file, a
    folder, a ``save_to_disk`` folder, or a dataset name with ``data_config``/``data_split``/``data_revision``).

    Each row's format is recognised from its fields (:func:`resonance.data.formats.detect_format`), or is
    ``data_format``; one source holds one format. ``check_images`` opens every image with PIL and ``verify()``s it,
    and refuses one over ``max_image_pixels`` (``--max_image_pixels``, read from the header, nothing decoded; 0: no
    limit); ``False`` skips all file checks. Relative image paths resolve against ``image_root``, else the data
    file's folder; http(s) images are downloaded only with ``allow_image_urls``. ``image_count``: the images a
    conversation may have, as the model family takes them; a row outside them is invalid. Fields no canonical row
    keeps are logged once per source with their row counts (:attr:`LoadedRows.unused`). ``allow_no_rows`` (with
    ``skip_invalid``): a source whose rows are all invalid gives no rows and their problems instead of an error
    (``resonance data inspect`` reports them).
    """
    _check_kind(kind)
    _check_placeholder(image_placeholder)
    check_pixel_budget(max_image_pixels)
    forced = None if data_format == "auto" else format_named(data_format)
    if forced is not None and kind not in forced.kinds:
        kinds = ", ".join(sorted(forced.kinds))
        raise ConfigError(f"--data_format {forced.name}: holds {kinds} rows, not the {kind} rows this command reads")
    source = open_rows(path, DatasetChoice(data_config, data_split, data_revision))
    root = Path(os.path.abspath(os.path.expanduser(image_root))) if image_root else None
    sources = ImageSources(base_dir=source.base_dir, image_root=root, allow_urls=allow_image_urls)
    converter = _RowConverter(
        sources, image_placeholder, check_images, max_image_pixels, image_count, video_placeholder
    )

    rows: list[dict[str, Any]] = []
    invalid: list[tuple[str, list[str]]] = []
    formats: dict[str, list[str]] = {}  # format name -> the sources of its rows
    for raw in source.rows:
        problems = [raw.error] if raw.error else []
        row = None
        if raw.error is None:
            row_format, row = converter.read(raw.value, kind, raw.source, problems, forced)
            if row_format is not None and not problems:
                formats.setdefault(row_format.name, []).append(raw.source)
        if problems:
            invalid.append((raw.source, problems))
        else:
            assert row is not None
            rows.append(row)

    display = source.display
    errors = [(where, message) for where, problems in invalid for message in problems]
    total = len(rows) + len(invalid)
    if total == 0:
        raise DataError([(display, "no rows: it holds no data")])
    mix = _format_mix(formats)
    if mix:  # not skippable: which rows are "the" format is for the user to say
        header = (
            f"{display}: rows in {len(mix)} formats; one source holds one format (convert the others, or pass "
            "--data_format NAME to read every row as that format)"
        )
        raise DataError(mix + errors, header=header)
    if not rows and not (allow_no_rows and skip_invalid):
        raise DataError(errors, header=f"{display}: no valid rows ({total} rows, all invalid)")
    if invalid and not skip_invalid:
        raise DataError(
            errors,
            header=(
                f"{display}: {len(errors)} problem(s) in {len(invalid)} of {total} rows"
                " (fix them, or pass --skip_invalid_rows to drop those rows)"
            ),
        )
    for where, problems in invalid:
        logger.warning("skipping invalid row %s: %s", where, "; ".join(problems))
    if invalid:
        logger.warning("skipped %d invalid of %d rows in %s", len(invalid), total, display)
    unused = dict(sorted(converter.unused.items()))
    if unused:
        fields = ", ".join(f"{name!r} ({count} rows)" for name, count in unused.items())
        logger.warning("%s: fields not used (no canonical row keeps them): %s", display, fields)
    name = next(iter(formats), None)
    return LoadedRows(display, kind, rows, skipped=len(invalid), problems=errors, format=name, unused=unused)


def _format_mix(formats: dict[str, list[str]]) -> list[tuple[str, str]]:
    """One problem per format when the valid rows of one source come in several, at each format's first row
    (Resonance's own spellings, :data:`_ONE_FORMAT`, count as one)."""
    if len({_ONE_FORMAT.get(name, name) for name in formats}) < 2:
        return []
    return [
        (sources[0], f"{len(sources)} row(s) in format {name!r} ({format_named(name).summary}), the first here")
        for name, sources in sorted(formats.items(), key=lambda item: -len(item[1]))
    ]


def convert_row(
    row: Any,
    kind: Kind,
    *,
    base_dir: str | os.PathLike[str] = ".",
    image_placeholder: str = "<image>",
    check_images: bool = True,
    source: str = "<row>",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    data_format: str = "auto",
) -> dict[str, Any]:
    """Canonicalise one raw row, images relative to ``base_dir``; raise :class:`DataError` if invalid."""
    _check_kind(kind)
    _check_placeholder(image_placeholder)
    check_pixel_budget(max_image_pixels)
    forced = None if data_format == "auto" else format_named(data_format)
    problems: list[str] = []
    sources = ImageSources(base_dir=Path(os.path.abspath(base_dir)))
    converter = _RowConverter(sources, image_placeholder, check_images, max_image_pixels, ANY_IMAGE_COUNT)
    _, converted = converter.read(row, kind, source, problems, forced)
    if problems or converted is None:
        raise DataError([(source, message) for message in problems])
    return converted


# ------------------------------------------------------------------------------------------ converting


class _RowConverter:
    """Turns raw rows into canonical rows, appending every problem found to a list of messages, and counting the
    fields no canonical row keeps (:attr:`unused`)."""

    def __init__(
        self,
        sources: ImageSources,
        placeholder: str,
        check_images: bool,
        max_image_pixels: int,
        image_count: ImageCount,
        video_placeholder: str = "<video>",
    ):
        self.sources = sources
        self.placeholder = placeholder
        self.video_placeholder = video_placeholder
        self._inline_videos: list[tuple[str, Any]] = []  # the current row's videos given inside its messages
        self.check_images = check_images
        self.max_image_pixels = max_image_pixels
        self.image_count = image_count  # images a conversation may have
        self.unused: Counter[str] = Counter()
        self._image_problems: dict[str, str | None] = {}
        self._inline: list[tuple[str, Any]] = []  # the current row's images given inside its messages
        self._detected: dict[tuple[frozenset[str], str], DataFormat | None] = {}

    def read(
        self, obj: Any, kind: Kind, source: str, problems: list[str], forced: DataFormat | None
    ) -> tuple[DataFormat | None, dict[str, Any] | None]:
        """The row's format and canonical row (``None`` when ``problems`` grew)."""
        if not isinstance(obj, dict):
            problems.append(f"a row must be a JSON object, got {json_type(obj)}")
            return None, None
        keys = frozenset(key for key, value in obj.items() if value is not None)  # a null field is an absent one
        if forced is not None:
            row_format = forced
        elif (keys, kind) in self._detected:  # rows of one source share their keys: detect once per key set
            row_format = self._detected[keys, kind]
        else:
            row_format = self._detected[keys, kind] = detect_format(keys, kind)
        if row_format is None:  # the native checks name what is missing; the hint names the other formats
            before = len(problems)
            self.convert(obj, kind, source, problems)
            hint = format_hint(keys, kind)
            if hint and len(problems) > before:
                problems[before] += f" ({hint})"
            return None, None
        native = row_format.to_native(obj, kind, problems)
        if native is None:
            return row_format, None
        return row_format, self.convert(native, kind, source, problems)

    def convert(self, obj: dict[str, Any], kind: Kind, source: str, problems: list[str]) -> dict[str, Any] | None:
        """The canonical row of a row in a native shape, or ``None`` when ``problems`` grew."""
        before = len(problems)
        self._inline = []
        groups = {"sft": _SFT_GROUPS, "preference": _PREFERENCE_GROUPS, "prompt": _PROMPT_GROUPS}[kind]
        self._inline_videos = []
        self._check_fields(obj, groups, problems)
        self._refuse_other_media(obj, problems)
        given = self._image_refs(obj, problems)
        images = self._resolve_images(given, problems) if given is not None else None
        given_videos = self._video_refs(obj, problems)
        margin = self._margin(obj, problems) if kind == "preference" else None
        if kind == "sft":
            columns = self._sft_messages(obj, problems)
        elif kind == "prompt":
            columns = self._prompt_messages(obj, problems)
        else:
            columns = self._preference_messages(obj, problems)
        if columns is None or images is None or given_videos is None or len(problems) > before:
            return None
        # A family (or algorithm) that takes no video refuses the row by name before any video file is looked at.
        parts = sum(p["type"] == "video" for ms in columns.values() for m in ms for p in m["content"])
        image_parts = sum(p["type"] == "image" for ms in columns.values() for m in ms for p in m["content"])
        video_problem = self.image_count.video_problem(
            max(len(given_videos), len(self._inline_videos), parts), max(len(images), len(self._inline), image_parts)
        )
        if video_problem is not None:
            problems.append(video_problem)
            return None
        if self._inline_videos and given_videos:
            problems.append(
                f"videos given twice: {len(self._inline_videos)} inside the messages and {len(given_videos)} in "
                "'video' / 'videos'; give each video once, in one of the two places"
            )
            return None
        videos = self._resolve_videos(self._inline_videos or given_videos, problems)
        if videos is None:
            return None
        if self._inline and images:
            problems.append(
                f"images given twice: {len(self._inline)} inside the messages and {len(images)} in "
                "'image' / 'images'; give each image once, in one of the two places"
            )
            return None
        images = self._resolve_images(self._inline, problems) if self._inline else images
        if images is None:
            return None
        fields = ("conversations", "messages") if kind == "sft" else ("prompt", "conversations", "messages")
        name = next(name for name in fields if name in obj)  # the field the conversation (or prompt) came from
        self._check_turn_order(name, next(iter(columns.values())), problems)
        count_problem = self.image_count.problem(len(images))
        if count_problem is not None:
            problems.append(count_problem)
            return None
        self._place_images(columns, len(images), problems)
        self._place_videos(columns, len(videos), problems)
        for column, messages in columns.items():
            name = "conversations" if column == "messages" and "conversations" in obj else column
            for i, message in enumerate(messages):
                if _is_empty(message["content"]):
                    problems.append(f"{name}[{i}]: empty {message['role']} turn; write its text")
        if len(problems) > before:
            return None
        media: dict[str, Any] = {"images": images, **({"videos": videos} if videos else {})}
        if kind == "prompt":
            row_id = json.dumps(obj["id"], default=str) if "id" in obj else None
            return {**columns, **media, "source": source, "id": row_id}
        if margin is not None:
            return {**columns, **media, "source": source, "margin": margin}
        return {**columns, **media, "source": source}

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
        """Flag unknown fields that are probably a misspelled known field or an unread image path; count the other
        unknown fields as unused."""
        known = {name for group in groups for name in group} | {*_OPTIONAL_FIELDS, *_MEDIA_FIELDS, *_VIDEO_FIELDS}
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
            else:
                self.unused[key] += 1

    def _refuse_other_media(self, obj: dict[str, Any], problems: list[str]) -> None:
        """An audio in the row's own fields is refused by name: no family takes it yet, and a row is never trained
        without part of what it holds."""
        for key in _MEDIA_FIELDS:
            if obj.get(key) not in (None, [], ""):
                problems.append(_media_problem(key, "audio"))

    def _video_refs(self, obj: dict[str, Any], problems: list[str]) -> list[tuple[str, Any]] | None:
        """The row's ``video`` (one video: a file, or a list of frame images) / ``videos`` (a list of videos)
        entries as ``(field, reference)`` pairs, not yet resolved."""
        if obj.get("video") not in (None, "") and obj.get("videos") not in (None, []):
            problems.append("has both 'video' and 'videos'; keep one")
            return None
        if obj.get("videos") not in (None, []):
            value = obj["videos"]
            if not isinstance(value, list):
                problems.append(
                    f"videos: must be a list of videos (each a file, or a list of frames), got {json_type(value)}"
                )
                return None
            return [(f"videos[{i}]", item) for i, item in enumerate(value)]
        if obj.get("video") not in (None, ""):
            return [("video", obj["video"])]
        return []

    def _resolve_videos(self, refs: list[tuple[str, Any]], problems: list[str]) -> list[dict[str, Any]] | None:
        """Each reference as a canonical video (a readable file, or readable frames of one size), or ``None`` when
        ``problems`` grew."""
        return self._resolve_media(
            refs,
            problems,
            resolve_video,
            lambda v: video_problem(v, self.max_image_pixels, self.image_count.least_frames),
        )

    def _image_refs(self, obj: dict[str, Any], problems: list[str]) -> list[tuple[str, Any]] | None:
        """The row's ``image`` / ``images`` entries as ``(field, reference)`` pairs, not yet resolved."""
        if "image" in obj and "images" in obj:
            problems.append("has both 'image' and 'images'; keep one")
            return None
        name = "images" if "images" in obj else "image"
        value = obj.get(name)
        if value is None:
            return []
        if isinstance(value, list):
            return [(f"{name}[{i}]", item) for i, item in enumerate(value)]
        if isinstance(value, str | bytes | dict) or _is_pil_image(value):
            return [(name, value)]
        expected = "an image (a path, URL or image data) or a list of them"
        problems.append(f"{name}: must be {expected}, got {json_type(value)}")
        return None

    def _resolve_images(self, refs: list[tuple[str, Any]], problems: list[str]) -> list[str] | None:
        """Each reference as the path of a readable image file within the pixel budget, or ``None`` when
        ``problems`` grew."""
        return self._resolve_media(refs, problems, resolve_image, self._image_problem)

    def _resolve_media(
        self,
        refs: list[tuple[str, Any]],
        problems: list[str],
        resolve: Callable[..., Any],
        problem_of: Callable[[Any], str | None],
    ) -> list[Any] | None:
        """Each reference resolved (``resolve``: an image's path, a canonical video) and, where files are checked,
        checked (``problem_of``); ``None`` when ``problems`` grew (each problem names its field)."""
        resolved: list[Any] = []
        before = len(problems)
        for where, ref in refs:
            try:
                media = resolve(ref, self.sources, check_files=self.check_images)
            except ImageRefError as exc:
                problems.append(f"{where}: {exc}")
                continue
            resolved.append(media)
            problem = problem_of(media) if self.check_images else None
            if problem:
                problems.append(f"{where}: {problem}")
        return None if len(problems) > before else resolved

    def _image_problem(self, path: str) -> str | None:
        if path not in self._image_problems:
            self._image_problems[path] = image_problem(path, self.max_image_pixels)  # resolve_image found the file
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
        answers = [m for m in messages if m["role"] == "assistant"]
        if not answers:
            turn = "'gpt'" if name == "conversations" else "'assistant'"
            problems.append(f"{name}: no {turn} turn; SFT needs at least one answer to learn from")
        elif all(m.get("train") is False for m in answers):
            problems.append(f"{name}: every answer is marked not to be learned (loss false); let one be learned")
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
                elif message.get("train") is False:
                    problems.append(f"{name}[{i}]: marked not to be learned (loss false), but {name} is the answer")
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
            problems.append(f"{name}: must be a list of messages, got {json_type(value)}")
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
            role = _LLAVA_ROLES[role] if llava else role
            for key in turn:
                if key not in (role_key, content_key, *_TURN_LOSS_KEYS):
                    self.unused[f"{name}[].{key}"] += 1
            trained = _turn_trained(turn, role, where, problems)
            content = self._content(turn[content_key], f"{where}.{content_key}", problems)
            if content is not None:
                message: Message = {"role": role, "content": content}
                if trained is False and role == "assistant":  # other turns are never supervised
                    message["train"] = False
                messages.append(message)
        return None if len(problems) > before else messages

    def _content(self, content: Any, where: str, problems: list[str]) -> list[Part] | None:
        if isinstance(content, str):
            return self._text_parts(content, where, problems)
        if not isinstance(content, list):
            problems.append(f"{where}: must be a string or a list of parts, got {json_type(content)}")
            return None
        parts: list[Part] = []
        before = len(problems)
        for j, part in enumerate(content):
            at = f"{where}[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.extend(self._text_parts(part["text"], f"{at}.text", problems))
            elif kind == "text":
                problems.append(f"{at}.text: must be a string, got {json_type(part.get('text'))}")
            elif kind in ("image", "image_url"):
                image = self._image_part(part, at, problems)
                if image is not None:
                    parts.append(image)
            elif kind in _VIDEO_PARTS:
                video = self._video_part(part, at, problems)
                if video is not None:
                    parts.append(video)
            elif kind in _MEDIA_PARTS:
                problems.append(_media_problem(at, _MEDIA_PARTS[kind]))
            else:
                problems.append(
                    f'{at}: a part must be {{"type": "text", "text": str}}, {{"type": "image"}} or {{"type": "video"}} '
                    f'(optionally with "image"/"video", "path" or "url"), or {{"type": "image_url", "image_url": '
                    f'{{"url": ...}}}}; got {part!r}'
                )
        return None if len(problems) > before else parts

    def _text_parts(self, text: str, where: str, problems: list[str]) -> list[Part]:
        """Text split at the image and video placeholders; an audio placeholder is refused, never trained as
        text."""
        if "<audio>" in text and self.placeholder != "<audio>":
            problems.append(_media_problem(f"{where} ('<audio>')", "audio"))
        return text_to_parts(text, self.placeholder, self.video_placeholder)

    def _video_part(self, part: dict[str, Any], at: str, problems: list[str]) -> Part | None:
        """A video part; one that carries its video (``video``, ``path`` or ``url``, or ``video_url``) adds it to
        the row's inline videos, in order."""
        return self._media_part("video", part, at, problems, self._inline_videos, video_part)

    def _image_part(self, part: dict[str, Any], at: str, problems: list[str]) -> Part | None:
        """An image part; one that carries its image (``image``, ``path`` or ``url``, or OpenAI's ``image_url``) adds
        it to the row's inline images, in order."""
        return self._media_part("image", part, at, problems, self._inline, image_part)

    @staticmethod
    def _media_part(
        kind: str, part: dict[str, Any], at: str, problems: list[str], inline: list, make: Callable[[], Part]
    ) -> Part | None:
        """An image or video part (``kind``); the media it carries (under ``kind``, ``path`` or ``url``, or OpenAI's
        ``KIND_url``) is appended to ``inline`` with where it was found."""
        if part["type"] == f"{kind}_url":
            url = part.get(f"{kind}_url")
            ref = url.get("url") if isinstance(url, dict) else url
            if not isinstance(ref, str):
                problems.append(f'{at}.{kind}_url: must be {{"url": str}} or a string, got {url!r}')
                return None
            inline.append((f"{at}.{kind}_url", ref))
            return make()
        keys = (kind, "path", "url")
        given = [key for key in keys if part.get(key) is not None]
        other = sorted(k for k in part if k not in ("type", *keys) and part[k] is not None)
        if len(given) > 1 or other:
            found = ", ".join(repr(k) for k in [*given, *other])
            what = {"image": 'its file in the row\'s "images"', "video": 'its video in the row\'s "videos"'}[kind]
            problems.append(
                f'{at}: {"an" if kind == "image" else "a"} {kind} part is {{"type": "{kind}"}} ({what}) or carries one '
                f"{kind} in '{kind}', 'path' or 'url'; found {found}"
            )
            return None
        if given:
            inline.append((f"{at}.{given[0]}", part[given[0]]))
        return make()

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
            for media, placeholder in (("image", self.placeholder), ("video", self.video_placeholder)):
                if message["role"] != "user" and any(p["type"] == media for p in message["content"]):
                    where = f"{name}[{i}]: {media} ({placeholder!r} or {_article(media)} part)"
                    role = _article(message["role"])
                    problems.append(f"{where} in {role} message; {media}s may only appear in user messages")

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

    def _place_videos(self, columns: dict[str, list[Message]], n_videos: int, problems: list[str]) -> None:
        """Check that video parts match the videos one to one, or put them all at the start of the first user turn,
        after its leading image parts."""
        count = sum(p["type"] == "video" for ms in columns.values() for m in ms for p in m["content"])
        if count == 0 and n_videos:
            first = next(iter(columns.values()))
            user = next((m for m in first if m["role"] == "user"), None)
            if user is None:
                problems.append(f"the row has {n_videos} video(s) but no user message to put them in")
                return
            content = user["content"]
            leading = next((i for i, p in enumerate(content) if p["type"] != "image"), len(content))
            user["content"] = content[:leading] + [video_part() for _ in range(n_videos)] + content[leading:]
        elif count != n_videos:
            problems.append(
                f"{count} video placeholder(s) ({self.video_placeholder!r} or video parts) but {n_videos} video(s)"
                " in 'video' / 'videos'; they must match one to one (or use no placeholder at all to put"
                " every video at the start of the first user message)"
            )


# -------------------------------------------------------------------------------------------- helpers


def _is_empty(parts: list[Part]) -> bool:
    return all(p["type"] == "text" and not (p["text"] or "").strip() for p in parts)


def _looks_like_image_paths(value: Any) -> bool:
    values = value if isinstance(value, list) and value else [value]
    return all(isinstance(v, str) and v.lower().endswith(_IMAGE_SUFFIXES) for v in values)


def _keys(obj: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in obj) or "no fields"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(repr(k) for k in KINDS)}, got {kind!r}")


def _check_placeholder(image_placeholder: str) -> None:
    if not isinstance(image_placeholder, str) or not image_placeholder:
        raise ValueError(f"image_placeholder must be a non-empty string, got {image_placeholder!r}")


def _article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _turn_trained(turn: dict[str, Any], role: str, where: str, problems: list[str]) -> bool | None:
    """A message's ``loss`` / ``training`` (true or false) or ``weight`` (1 or 0): False when it says the turn is
    not supervised, None when it says nothing (or true). Only assistant turns are supervised, so true elsewhere is
    refused rather than ignored."""
    said: bool | None = None
    for key in _TURN_LOSS_KEYS:
        if key not in turn or turn[key] is None:
            continue
        value = turn[key]
        valid = value in (0, 1) and not isinstance(value, float) if key == "weight" else isinstance(value, bool)
        if not valid:
            expected = "0 or 1" if key == "weight" else "true or false"
            problems.append(f"{where}.{key}: must be {expected} (whether this turn is supervised), got {value!r}")
            continue
        trained = bool(value)
        if said is not None and said != trained:
            problems.append(f"{where}: its {', '.join(k for k in _TURN_LOSS_KEYS if k in turn)} disagree")
            return None
        said = trained
    if said and role != "assistant":
        problems.append(f"{where}: only assistant turns are supervised; a {role} turn cannot be trained on")
        return None
    return False if said is False else None


def _media_problem(where: str, media: str) -> str:
    return (
        f"{where}: a{'n' if media == 'audio' else ''} {media}; no model family here takes {media} yet, and it is "
        f"never dropped silently: remove it, or pass --skip_invalid_rows to skip (and count) such rows"
    )


def _is_pil_image(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)
