"""Where rows come from: a data file, a folder, a ``save_to_disk`` folder or a dataset name, read into raw rows that
each know their place (``FILE:LINE`` or ``FILE:row N``), before any row is interpreted.

JSON Lines and JSON lists are read here, line by line, because ``datasets`` cannot say where a row is (its
``json`` builder gives no line numbers, keeps the last of two duplicate keys silently, and refuses a file whose
rows disagree in type, such as ``content`` a string in one message and a list of parts in the next, which the
chat formats allow). Everything else goes through ``datasets``: ``load_dataset`` for parquet, arrow and csv files
and folders of them, ``load_from_disk`` for ``save_to_disk`` folders, ``load_dataset(name, config, split=...,
revision=...)`` for a dataset name.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from resonance.errors import ConfigError, DataError

LINE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json")
# datasets' packaged builders for the other file types we take.
BUILDER_SUFFIXES: dict[str, str] = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv"}
SUPPORTED = (
    "a .jsonl, .json, .parquet, .arrow or .csv file, a folder of them, a folder written by datasets' save_to_disk, "
    "or a dataset name"
)


@dataclass(frozen=True)
class RawRow:
    """One row as read: its place (``FILE:LINE`` or ``FILE:row N``), and its value or why it could not be read."""

    source: str
    value: Any = None
    error: str | None = None


@dataclass(frozen=True)
class RowSource:
    """The raw rows of one data source, read as they are iterated (once); ``base_dir`` is the folder relative image
    paths resolve against (None for a dataset name, which has no folder of its own)."""

    display: str
    base_dir: Path | None
    rows: Iterable[RawRow]


@dataclass(frozen=True)
class DatasetChoice:
    """``--data_config``, ``--data_split`` and ``--data_revision``: which part of a dataset to read."""

    config: str | None = None
    split: str | None = None
    revision: str | None = None


def open_rows(path: str | os.PathLike[str], choice: DatasetChoice = DatasetChoice()) -> RowSource:
    """The raw rows of ``path``: a file, a folder, a ``save_to_disk`` folder or a dataset name. A source that cannot
    be read at all is a :class:`DataError` naming it; a config or revision given for a local file, a
    :class:`ConfigError`."""
    display = os.fspath(path)
    local = Path(os.path.expanduser(display))
    if local.is_file():
        _refuse(choice, display)
        return _open_file(local, display)
    if local.is_dir():
        return _open_folder(local, display, choice)
    if local.exists():
        raise DataError([(display, f"not a file or folder; expected {SUPPORTED}")])
    if _looks_like_dataset_name(display):
        return _open_named(display, choice)
    raise DataError([(display, f"file not found; expected {SUPPORTED}")])


# --------------------------------------------------------------------------------------------- local files


def _open_file(file: Path, display: str) -> RowSource:
    suffix = file.suffix.lower()
    base = Path(os.path.abspath(file)).parent
    if suffix == ".jsonl":
        return RowSource(display, base, _read_jsonl(file, display))
    if suffix == ".json":
        return RowSource(display, base, _read_json_list(file, display))
    if suffix in BUILDER_SUFFIXES:
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        dataset = _load(display, BUILDER_SUFFIXES[suffix], data_files=str(file), split="train", **kwargs)
        return RowSource(display, base, _dataset_rows(dataset, display))
    found = repr(suffix) if suffix else "no extension"
    raise DataError([(display, f"unsupported file type ({found}); expected {SUPPORTED}")])


def _open_folder(folder: Path, display: str, choice: DatasetChoice) -> RowSource:
    """A ``save_to_disk`` folder (a Dataset, or a DatasetDict and a split), or a folder of data files."""
    base = Path(os.path.abspath(folder))
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        _refuse(choice, display, split=False)
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as exc:  # datasets raises several types for a damaged folder
            message = f"cannot be read by datasets.load_from_disk: {type(exc).__name__}: {exc}"
            raise DataError([(display, message)]) from None
        dataset = _pick_split(loaded, choice.split, display) if isinstance(loaded, datasets.DatasetDict) else loaded
        if not isinstance(loaded, datasets.DatasetDict):
            _refuse(choice, display)
        return RowSource(display, base, _dataset_rows(dataset, display))
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not _hidden(p.relative_to(folder))]
    data_files = [p for p in files if p.suffix.lower() in (*LINE_SUFFIXES, *BUILDER_SUFFIXES)]
    line_files = [p for p in data_files if p.suffix.lower() in LINE_SUFFIXES]
    if line_files and len(line_files) == len(data_files):
        _refuse(choice, display)
        sources = (_open_file(p, os.path.join(display, p.relative_to(folder))) for p in line_files)
        return RowSource(display, base, itertools.chain.from_iterable(source.rows for source in sources))
    if not any(p.suffix.lower() in BUILDER_SUFFIXES for p in files):
        raise DataError([(display, f"a folder with no data files; expected {SUPPORTED}")])
    _refuse(choice, display, split=False)
    dataset = _load(display, str(folder), split=choice.split or "train")
    return RowSource(display, base, _dataset_rows(dataset, display))


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _refuse(choice: DatasetChoice, display: str, *, split: bool = True) -> None:
    """Refuse ``--data_config`` / ``--data_revision`` (and ``--data_split`` unless ``split`` is False) for a local
    source that has no such parts."""
    flags = (
        ("--data_config", choice.config),
        ("--data_split", split and choice.split),
        ("--data_revision", choice.revision),
    )
    given = [flag for flag, value in flags if value]
    if given:
        raise ConfigError(
            f"{' and '.join(given)}: {display} has no such parts (they choose parts of a dataset name, or a split "
            "of a save_to_disk folder or a folder of split files); leave them out"
        )


# ------------------------------------------------------------------------------------- datasets' loaders


def _looks_like_dataset_name(text: str) -> bool:
    """``name`` or ``owner/name`` as the Hub spells it: no file suffix we read, no more than one slash."""
    parts = text.split("/")
    suffix = Path(text).suffix.lower()
    return 1 <= len(parts) <= 2 and all(parts) and suffix not in (*LINE_SUFFIXES, *BUILDER_SUFFIXES)


def _open_named(name: str, choice: DatasetChoice) -> RowSource:
    dataset = _load(name, name, split=choice.split or "train", revision=choice.revision, name=choice.config)
    return RowSource(name, None, _dataset_rows(dataset, name))


def _load(display: str, builder: str, **kwargs: Any) -> datasets.Dataset:
    """``datasets.load_dataset`` with its failures as one line naming the source."""
    try:
        dataset = datasets.load_dataset(builder, **kwargs)
    except ValueError as exc:
        if "corresponds to no data" in str(exc):  # a file with a header and no rows, or none at all
            raise DataError([(display, "no rows: it holds no data")]) from None
        if "Unknown split" in str(exc) or "Bad split" in str(exc):
            message = f"no split {kwargs.get('split')!r} ({exc}); pick one with --data_split"
            raise DataError([(display, message)]) from None
        raise DataError([(display, f"cannot be read by datasets.load_dataset: {exc}")]) from None
    except (ConnectionError, OSError) as exc:
        if builder == display and not os.path.exists(display):
            raise DataError(
                [
                    (
                        display,
                        "no such file or folder, and the dataset cannot be loaded from the Hub "
                        f"({type(exc).__name__}: {exc}); where the Hub is reachable run "
                        f"`datasets.load_dataset({display!r}).save_to_disk(FOLDER)` and pass that folder",
                    )
                ]
            ) from None
        raise DataError([(display, f"cannot be read: {type(exc).__name__}: {exc}")]) from None
    except Exception as exc:  # the builders raise arrow, pandas and datasets errors for a malformed file
        raise DataError([(display, f"cannot be read by datasets: {type(exc).__name__}: {exc}")]) from None
    return dataset


def _pick_split(loaded: datasets.DatasetDict, split: str | None, display: str) -> datasets.Dataset:
    names = list(loaded)
    chosen = split or ("train" if "train" in loaded else names[0] if len(names) == 1 else None)
    if chosen is None or chosen not in loaded:
        given = f"no split {chosen!r}" if chosen else f"{len(names)} splits and no 'train'"
        raise DataError(
            [(display, f"{given}; its splits are {', '.join(map(repr, names))}: pick one with --data_split")]
        )
    return loaded[chosen]


def _undecoded(feature: Any) -> Any:
    """``feature`` with every image, audio and video left undecoded: rows hold ``{"bytes", "path"}`` structs, so
    nothing is decoded before a row is checked (and audio and video are refused by name, not decoded)."""
    if isinstance(feature, datasets.Image | datasets.Audio | datasets.Video):
        return type(feature)(decode=False)  # type: ignore[call-arg]
    if isinstance(feature, dict):
        return {key: _undecoded(value) for key, value in feature.items()}
    if isinstance(feature, datasets.List):
        return datasets.List(_undecoded(feature.feature), length=feature.length)
    if isinstance(feature, datasets.LargeList):
        return datasets.LargeList(_undecoded(feature.feature))
    return feature


def _dataset_rows(dataset: datasets.Dataset, display: str) -> Iterator[RawRow]:
    """A dataset's rows as plain values, named ``DISPLAY:row N`` (N as in ``dataset[N]``) plus the ``id`` column's
    value where there is one. Arrow stores a missing struct key as null, so null keys of objects are dropped: a
    row reads as it was written. Read in arrow batches, nothing decoded (twice as fast as row by row)."""
    features = datasets.Features({name: _undecoded(f) for name, f in dataset.features.items()})
    if features != dataset.features:
        dataset = dataset.cast(features)
    has_id = "id" in dataset.column_names
    index = 0
    for batch in dataset.with_format("arrow").iter(batch_size=1000):
        for value in batch.to_pylist():
            value = _without_nulls(value)
            where = f"{display}:row {index}"
            if has_id and value.get("id") is not None:
                where += f" (id {json.dumps(value['id'], default=str)})"
            index += 1
            yield RawRow(where, value)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


# ------------------------------------------------------------------------------------- JSON, line by line


class _JsonDecoder:
    """``json`` decoding that records duplicate keys instead of letting the last one win silently."""

    def __init__(self, display: str) -> None:
        self.display = display
        self.duplicates: list[str] = []
        self.decoder = json.JSONDecoder(object_pairs_hook=self._object)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                self.duplicates.append(key)
            obj[key] = value
        return obj

    def row(self, line: int, value: Any) -> RawRow:
        """Wrap a decoded value, turning duplicate keys found while decoding it into a row error."""
        duplicates, self.duplicates = self.duplicates, []
        source = f"{self.display}:{line}"
        if duplicates:
            keys = ", ".join(repr(k) for k in dict.fromkeys(duplicates))
            return RawRow(source, error=f"duplicate key(s) {keys} in one object; JSON keeps only the last")
        return RawRow(source, value)


def _read_jsonl(file: Path, display: str) -> Iterator[RawRow]:
    decoder = _JsonDecoder(display)
    for index, raw_line in enumerate(file.read_bytes().split(b"\n")):
        line = index + 1
        try:
            text = raw_line.decode("utf-8-sig" if index == 0 else "utf-8")
        except UnicodeDecodeError as exc:
            yield RawRow(f"{display}:{line}", error=f"not valid UTF-8 (byte {exc.start + 1} of the line)")
            continue
        if not text.strip():
            continue
        try:
            value = decoder.decoder.decode(text)
        except json.JSONDecodeError as exc:
            decoder.duplicates = []
            yield RawRow(f"{display}:{line}", error=f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        yield decoder.row(line, value)


def _read_json_list(file: Path, display: str) -> list[RawRow]:
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError([(f"{display}:{line}", "not valid UTF-8")]) from None
    decoder = _JsonDecoder(display)
    rows: list[RawRow] = []
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
