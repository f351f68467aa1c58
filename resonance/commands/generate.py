"""``resonance generate``: answers for every row of a prompt file, written atomically as JSON Lines."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from resonance.base.registry import load_core_mapper
from resonance.commands.flags import generation_problems, parse_generation_overrides, raise_problems
from resonance.data.images import ImageCount
from resonance.data.rows import read_rows
from resonance.errors import EXIT_OK, ConfigError, OutputExistsError, ResonanceError
from resonance.generation import generate_batch, generation_kwargs, load_for_generation

logger = logging.getLogger("resonance")


def _file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class _AtomicOutput:
    """A temporary file next to ``path``, renamed onto it by :meth:`commit`; removed otherwise (errors, Ctrl-C)."""

    def __init__(self, path: Path, overwrite: bool):
        self.path = path
        self.overwrite = overwrite
        try:
            handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as exc:  # the one sure test of a writable folder (permissions, ACLs, read-only mounts, root)
            raise ConfigError(
                f"--output {path}: cannot write in {path.parent} ({exc.strerror}); choose a folder you can write to"
            ) from None
        os.fchmod(handle, _file_mode())  # mkstemp makes it 0600; the answers are an ordinary file
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


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's time limit) ends the process through ``SystemExit(143)``, so ``finally`` and
    ``except`` blocks run (the temporary output is removed) instead of the process vanishing mid-write."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    data_options: dict[str, Any] | None = None,
) -> int:
    """Generate an answer for every prompt row of ``data_path`` into ``output`` (JSONL, input order);
    ``data_options`` are :func:`~resonance.data.rows.read_rows`'s options (format, image root, split, ...).

    Returns the number of rows written. Raises :class:`ConfigError`, ``DataError`` or ``RowError`` before
    anything is written; the output appears only once every row is done.
    """
    from rich.console import Console

    output = Path(output)
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {batch_size}")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
    if output.exists() and not output.is_file():
        raise ConfigError(f"{output} exists and is not a file")
    if not output.parent.is_dir():
        raise ConfigError(f"{output.parent}: no such folder for the output")
    console = console or Console(stderr=True, soft_wrap=True, highlight=False)
    # The temporary output first: an unwritable folder fails here, before anything loads; from here on, whatever
    # ends the run (an error, Ctrl-C, SIGTERM) removes it.
    target = _AtomicOutput(output, overwrite)
    try:
        with _terminate_as_exit():
            loaded = _generate(
                model_name_or_path,
                data_path,
                target,
                batch_size,
                skip_invalid_rows,
                seed,
                overrides,
                console,
                data_options or {},
            )
            target.commit()
    except BaseException:
        target.discard()
        raise
    skipped = f"; {loaded.skipped} invalid rows skipped" if loaded.skipped else ""
    console.print(f"wrote {len(loaded.rows)} answers to {output}{skipped}", markup=False, highlight=False)
    return len(loaded.rows)


def _generate(
    model_name_or_path: str,
    data_path: str,
    target: _AtomicOutput,
    batch_size: int,
    skip_invalid_rows: bool,
    seed: int | None,
    overrides: dict[str, Any] | None,
    console: Any,
    data_options: dict[str, Any],
) -> Any:
    """Check, load, generate every row into ``target``; return the loaded rows (``read_rows``'s result)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    mapper = load_core_mapper(model_name_or_path)  # an unsupported checkpoint fails before the data is read
    # The family's defaults with the overrides: sampling at temperature 0 fails now, not after the model loads.
    raise_problems(generation_problems({**mapper.model.default_generation_kwargs, **(overrides or {})}), "generate")
    processor_cls = mapper.processor
    # Data before the model: a bad row should fail in a second, naming its FILE:LINE.
    loaded = read_rows(
        data_path,
        "prompt",
        image_placeholder=processor_cls.image_placeholder,
        skip_invalid=skip_invalid_rows,
        image_count=ImageCount.for_family(processor_cls),
        **data_options,
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
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
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
    return loaded


def main(
    model_name_or_path: str,
    data_path: str,
    output: str,
    extra_args: Sequence[str],
    command_flags: Sequence[str] = (),
    **options: Any,
) -> int:
    """The ``resonance generate`` command: :func:`run` with errors printed as ``error: ...``; the exit code.
    ``extra_args`` are the generation flags; ``command_flags`` the command's own, for did-you-mean."""

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_generation_overrides(extra_args, command_flags)
        run(model_name_or_path, data_path, output, overrides=overrides, **options)
    except ResonanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return EXIT_OK
