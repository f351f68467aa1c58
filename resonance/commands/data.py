"""``resonance data inspect FILE``: what a data file holds and how each ``--model`` family tokenizes it, before a
long job: the detected format, row counts, image counts, token-length percentiles per family, unused fields and
the first problems; with ``--html`` a self-contained page of sampled rows with their supervised tokens
highlighted. Only processors are loaded, never model weights; without ``--model`` neither torch nor transformers
is imported.

Exit codes: 0 every row is valid (and every family takes it), 1 some rows are not (the report still prints), 2
the file, a flag or a checkpoint cannot be used at all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from jinja2 import TemplateError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from resonance.data.images import ImageCount, image_size, load_row_images
from resonance.data.inspect import (
    ConversationView,
    FamilyReport,
    ImageStats,
    SampleView,
    all_problems,
    image_stats,
    length_stats,
    read_for_inspection,
    render_page,
    sample_indices,
    thumbnail_uri,
    token_segments,
)
from resonance.data.rows import LoadedRows
from resonance.errors import EXIT_FAILED, EXIT_OK, ConfigError, DataError, OutputExistsError, ResonanceError


@dataclass(frozen=True)
class _Family:
    """One ``--model``: the checkpoint as given, its adapter's name and its processor."""

    label: str
    name: str
    processor: Any


def inspect_data(
    path: str,
    *,
    kind: str = "auto",
    models: list[str] | None = None,
    html: str | Path | None = None,
    sample: int = 8,
    max_problems: int = 20,
    overwrite: bool = False,
    data_options: dict[str, Any] | None = None,
    console: Console | None = None,
) -> int:
    """Print the report of ``path`` (and write the ``html`` page); return 0 when every row is valid for every
    family, 1 otherwise. ``data_options``: the data flags training takes (``data_format``, ``image_root``,
    ``data_split``, ...). Raises a :class:`ResonanceError` (exit 2) for a file, flag or checkpoint that cannot be
    used, before any output is written."""
    console = console or Console(soft_wrap=True, highlight=False)
    if sample < 0 or max_problems < 0:
        raise ConfigError(f"--sample and --max_problems must be >= 0, got {sample} and {max_problems}")
    output = Path(html) if html is not None else None
    if output is not None and output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
    if output is not None and not output.parent.is_dir():
        raise ConfigError(f"--html {output}: no such folder {output.parent}")
    families = [_load_family(ckpt) for ckpt in models or []]  # a bad checkpoint fails before the data is read
    placeholder = families[0].processor.image_placeholder if families else "<image>"
    with _quiet(logging.getLogger("resonance.data")):  # the report lists what the loader would log
        data = read_for_inspection(path, kind, image_placeholder=placeholder, **(data_options or {}))
    images = image_stats(data.rows)
    reports = [_family_report(family, data.rows) for family in families]
    _print_report(console, data, images, reports, max_problems)
    if output is not None:
        samples = [_sample_view(data.rows[i], families) for i in sample_indices(len(data.rows), sample)]
        _write_page(output, render_page(data, images, reports, samples, max_problems), overwrite)
        console.print(f"wrote {output}", markup=False)
    return EXIT_FAILED if data.skipped or any(report.problems for report in reports) else EXIT_OK


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """``logger``'s warnings and datasets' progress bars off for the block: the report says what they would."""
    level, bars = logger.level, not datasets.utils.are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.utils.enable_progress_bars()


def _load_family(checkpoint: str) -> _Family:
    from resonance.base.registry import load_core_mapper  # torch: only with --model

    mapper = load_core_mapper(checkpoint)
    processor = mapper.processor(checkpoint)
    return _Family(checkpoint, mapper.processor.__module__.rsplit(".", 1)[-1], processor)


def _family_report(family: _Family, rows: list[dict[str, Any]]) -> FamilyReport:
    """The family's token lengths of the rows it takes, and the rows it does not: an image count it cannot take, a
    video where it takes none, or a conversation its chat template cannot render (named by :func:`fit_rows`, as
    training names them)."""
    from resonance.algorithms.lengths import fit_rows, row_lengths

    count = ImageCount.for_family(family.processor)
    problems = [
        (row["source"], p)
        for row in rows
        if (
            p := count.problem(len(row["images"]))
            or count.video_problem(len(row.get("videos") or []), len(row["images"]))
        )
        is not None
    ]
    refused = {source for source, _ in problems}
    fit = [row for row in rows if row["source"] not in refused]
    try:
        lengths = row_lengths(fit, family.processor)
    except (TemplateError, ValueError):  # some row it cannot render: name every one, as training would
        try:
            fit_rows(fit, _NoLimit(family.processor), skip_invalid_rows=False)
        except DataError as exc:
            problems += exc.errors
        refused = {source for source, _ in problems}
        fit = [row for row in fit if row["source"] not in refused]
        lengths = row_lengths(fit, family.processor)
    return FamilyReport(family.label, family.name, length_stats(lengths), problems)


@dataclass(frozen=True)
class _NoLimit:
    """What :func:`fit_rows` reads of a collator, for rendering checks only: no ``--max_length``."""

    processor: Any
    max_length: None = None
    skip_long_rows: bool = False


def _sample_view(row: dict[str, Any], families: list[_Family]) -> SampleView:
    images = [(path, *image_size(path), thumbnail_uri(path)) for path in row["images"]]
    views = {f"{f.label} ({f.name})": _conversations(f.processor, row) for f in families}
    return SampleView(row["source"], images, views)


def _conversations(processor: Any, row: dict[str, Any]) -> list[ConversationView]:
    """The row as the family's collator tokenizes it: an SFT conversation, a preference row's prompt + chosen and
    prompt + rejected, or a prompt row's prompt with the generation prompt (nothing supervised)."""
    from resonance.base.processor import IGNORE_INDEX

    try:
        images = load_row_images(processor, row["images"], row["source"])
        if "messages" in row:
            titles = ["conversation"]
            batch = processor.process_batch_conv([row["messages"]], [images])
        elif "chosen" in row:
            titles = ["chosen", "rejected"]
            conversations = [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
            batch = processor.process_batch_conv(conversations, [images, images], [len(row["prompt"])] * 2)
        else:
            titles = ["prompt"]
            text = processor.render_conversation(row["prompt"], add_generation_prompt=True)
            batch = processor(text=[text], images=[images])
    except (ResonanceError, TemplateError, ValueError) as exc:
        return [ConversationView("conversation", error=f"this family cannot take the row: {exc}")]
    views = []
    for index, title in enumerate(titles):
        keep = batch["attention_mask"][index].bool()
        ids = batch["input_ids"][index][keep].tolist()
        labels = batch["labels"][index][keep].tolist() if "labels" in batch else [IGNORE_INDEX] * len(ids)
        supervised = [label != IGNORE_INDEX for label in labels]
        segments = token_segments(ids, supervised, processor.image_token_id, processor.tokenizer.decode)
        views.append(ConversationView(title, segments))
    return views


def _write_page(output: Path, page: str, overwrite: bool) -> None:
    """Write the page atomically: a temporary file renamed onto ``output``, never over a file that appeared
    meanwhile unless ``overwrite``."""
    from resonance.commands.generate import _AtomicOutput

    target = _AtomicOutput(output, overwrite)
    try:
        target.file.write(page)
        target.commit()
    except BaseException:
        target.discard()
        raise


def _print_report(
    console: Console, data: LoadedRows, images: ImageStats, families: list[FamilyReport], max_problems: int
) -> None:
    summary = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    buckets = images.rows_with
    largest = f"; largest {images.largest[1]} x {images.largest[2]}: {images.largest[0]}" if images.largest else ""
    unused = ", ".join(f"{name} ({count} rows)" for name, count in data.unused.items())
    for name, value in [
        ("file", data.path),
        ("format", data.format or "(none: no valid row)"),
        ("kind", data.kind),
        ("rows", f"{len(data.rows)} valid, {data.skipped} invalid"),
        ("rows with 0 / 1 / 2+ images", f"{buckets['0']} / {buckets['1']} / {buckets['2+']}"),
        ("images", f"{images.total} ({images.distinct} distinct files){largest}"),
        ("unused fields", unused or "none"),
    ]:
        summary.add_row(name, Text(value))  # Text: paths and field names are not rich markup
    console.print(summary)
    if families:
        lengths = Table("model", "family", "rows", "p50", "p90", "p99", "max", "rows it cannot take")
        lengths.title = "token lengths (image tokens included)"
        for family in families:
            stats = family.lengths
            numbers = [stats.rows, stats.p50, stats.p90, stats.p99, stats.max] if stats else [0, "-", "-", "-", "-"]
            lengths.add_row(Text(family.label), family.family, *map(str, numbers), str(len(family.problems)))
        console.print(lengths)
    problems = all_problems(data, families)
    if not problems:
        console.print("problems: none", markup=False)
        return
    more = f" (first {max_problems} of {len(problems)})" if len(problems) > max_problems else ""
    console.print(f"problems{more}:", markup=False)
    for source, message in problems[:max_problems]:
        console.print(f"  {source}: {message}", markup=False)


def main(path: str, **options: Any) -> int:
    """The ``resonance data inspect`` command: :func:`inspect_data`, errors printed as ``error: ...``; the exit
    code."""
    try:
        return inspect_data(path, **options)
    except ResonanceError as exc:
        Console(stderr=True, soft_wrap=True, highlight=False).print(f"error: {exc}", markup=False)
        return exc.exit_code
