"""``resonance generate``: answers for every row of a prompt file, written atomically as JSON Lines."""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from resonance.base.registry import load_core_mapper
from resonance.data.images import ImageCount
from resonance.data.rows import read_rows
from resonance.errors import EXIT_OK, ConfigError, OutputExistsError, ResonanceError
from resonance.generation import generate_batch, generation_kwargs, load_for_generation

logger = logging.getLogger("resonance")


def _parse_value(text: str) -> Any:
    """``true``/``false`` (any case), JSON numbers, lists and null; anything else is a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_generation_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["--max_new_tokens", "64", "--do_sample=true", ...]`` -> ``{"max_new_tokens": 64, "do_sample": True}``.

    Every key must be a ``transformers.GenerationConfig`` field; a misspelling is an error with a suggestion.
    """
    from transformers import GenerationConfig

    fields = sorted(k for k in GenerationConfig().to_dict() if not k.startswith("_"))
    overrides: dict[str, Any] = {}
    args = list(args)
    while args:
        flag = args.pop(0)
        if not flag.startswith("--") or flag == "--":
            raise ConfigError(f"unexpected argument {flag!r}; generation settings are written --name value")
        name, has_value, value = flag[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            match = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean --{match[0]}?" if match else " (see transformers.GenerationConfig)"
            raise ConfigError(f"unknown option --{name}: not a generation setting{hint}")
        if not has_value:
            if not args or args[0].startswith("--"):
                raise ConfigError(f"--{name} needs a value")
            value = args.pop(0)
        overrides[name] = _parse_value(value)
    return overrides


class _AtomicOutput:
    """A temporary file next to ``path``, renamed onto it by :meth:`commit`; removed otherwise (errors, Ctrl-C)."""

    def __init__(self, path: Path, overwrite: bool):
        self.path = path
        self.overwrite = overwrite
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.temp = Path(name)
        self.file = os.fdopen(handle, "w", encoding="utf-8")

    def write(self, obj: dict[str, Any]) -> None:
        self.file.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self.file.close()
        if self.overwrite:
            os.replace(self.temp, self.path)
            return
        try:
            os.link(self.temp, self.path)  # fails if the output appeared meanwhile: never clobber without --overwrite
        except FileExistsError:
            raise OutputExistsError(f"{self.path} exists (created while generating); pass --overwrite") from None
        except OSError:  # no hard links on this file system
            if self.path.exists():
                raise OutputExistsError(f"{self.path} exists (created while generating); pass --overwrite") from None
            os.replace(self.temp, self.path)
            return
        self.temp.unlink()

    def discard(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


def run(
    model_name_or_path: str,
    data_path: str,
    output: str | Path,
    *,
    batch_size: int = 8,
    overwrite: bool = False,
    skip_invalid_rows: bool = False,
    seed: int | None = None,
    overrides: dict[str, Any] | None = None,
    console: Any = None,
) -> int:
    """Generate an answer for every prompt row of ``data_path`` into ``output`` (JSONL, input order).

    Returns the number of rows written. Raises :class:`ConfigError`, ``DataError`` or ``RowError`` before
    anything is written; the output appears only once every row is done.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    output = Path(output)
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {batch_size}")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
    if output.exists() and not output.is_file():
        raise ConfigError(f"{output} exists and is not a file")
    if not output.parent.is_dir():
        raise ConfigError(f"{output.parent}: no such folder for the output")
    mapper = load_core_mapper(model_name_or_path)  # an unsupported checkpoint fails before the data is read
    processor_cls = mapper.processor
    # Data before the model: a bad row should fail in a second, naming its FILE:LINE.
    loaded = read_rows(
        data_path,
        "prompt",
        image_placeholder=processor_cls.image_placeholder,
        skip_invalid=skip_invalid_rows,
        image_count=ImageCount.for_family(processor_cls),
    )
    rows = loaded.rows
    vl_model, model, processor = load_for_generation(model_name_or_path)
    # Image placeholder tokens are never generated (unless --suppress_tokens says otherwise).
    kwargs = generation_kwargs(
        vl_model, model, {"suppress_tokens": processor.placeholder_token_ids(), **(overrides or {})}
    )
    logger.info("generation kwargs: %s", kwargs)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)

    console = console or Console(stderr=True, soft_wrap=True, highlight=False)
    target = _AtomicOutput(output, overwrite)
    try:
        columns = (
            TextColumn("generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("generate", total=len(rows))
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                result = generate_batch(model, processor, vl_model, batch, kwargs)
                for row, prompt, text in zip(batch, result.prompts, result.texts, strict=True):
                    record: dict[str, Any] = {"source": row["source"]}
                    if row.get("id") is not None:
                        record["id"] = json.loads(row["id"])
                    record.update(prompt=prompt, answer=text)
                    target.write(record)
                progress.advance(task, len(batch))
        target.commit()
    except BaseException:
        target.discard()
        raise
    skipped = f"; {loaded.skipped} invalid rows skipped" if loaded.skipped else ""
    console.print(f"wrote {len(rows)} answers to {output}{skipped}", markup=False, highlight=False)
    return len(rows)


def main(
    model_name_or_path: str,
    data_path: str,
    output: str,
    extra_args: Sequence[str],
    **options: Any,
) -> int:
    """The ``resonance generate`` command: :func:`run` with errors printed as ``error: ...``; the exit code."""

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_generation_overrides(extra_args)
        run(model_name_or_path, data_path, output, overrides=overrides, **options)
    except ResonanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return EXIT_OK
