"""``resonance generate``: answers for every row of a prompt file, written atomically as JSON Lines.

With ``--num_return_sequences N`` (sampling, or N of the beams) each line holds the prompt's N answers (``answers``,
a list) instead of one (``answer``); transformers' ``generate`` samples them side by side. It repeats each prompt once
per answer (per beam in beam search) before the first forward pass; here each prompt is prefilled once for all of
them (:func:`~resonance.patches.shared_prefill.prefill_once`), as GRPO's groups are.

Started by ``accelerate launch`` (or torchrun) it runs on every process: the rows are dealt out in turn (row ``i`` to
process ``i % N``), every process runs as many batches (the last padded with a copy of a row, whose answer is
dropped), and after each batch the first process gathers the answers and writes them in the input's order. Under
FSDP and DeepSpeed ZeRO-3 the weights are sharded across the processes (the model need not fit on one device) and
every forward pass is collective: generation is then synchronised (``synced_gpus``: a process whose answers have
ended keeps joining the others' forward passes), and a batch without images still runs the image encoder
(:meth:`~resonance.algorithms.image_features.ImageEncodingMixin._idle_encoder`), as in training.
"""

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
from resonance.generation import (
    Generation,
    adapters_merged,
    generate_from,
    generation_kwargs,
    load_for_generation,
)

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
    processes = Processes.launched()
    # The temporary output first: an unwritable folder fails here, before anything loads; from here on, whatever
    # ends the run (an error, Ctrl-C, SIGTERM) removes it. Only the first process writes.
    target = _AtomicOutput(output, overwrite) if processes.main else None
    try:
        with _terminate_as_exit():
            loaded = _generate(
                model_name_or_path,
                data_path,
                target,
                processes,
                batch_size,
                skip_invalid_rows,
                seed,
                overrides,
                console,
                data_options or {},
            )
            if target is not None:
                target.commit()
    except BaseException:
        if target is not None:
            target.discard()
        raise
    processes.end()  # the output is complete when any process returns
    if processes.main:
        skipped = f"; {loaded.skipped} invalid rows skipped" if loaded.skipped else ""
        console.print(f"wrote {len(loaded.rows)} answers to {output}{skipped}", markup=False, highlight=False)
    return len(loaded.rows)


class Processes:
    """The processes ``resonance generate`` runs on: one, or those ``accelerate launch`` started, with the
    accelerator that joins them (see the module docstring)."""

    def __init__(self, accelerator: Any = None):
        self.accelerator = accelerator
        self.count = 1 if accelerator is None else accelerator.num_processes
        self.index = 0 if accelerator is None else accelerator.process_index
        self.main = self.index == 0
        self.engine: Any = None

    @classmethod
    def launched(cls) -> Processes:
        """The processes of this run: several when started by ``accelerate launch``/torchrun with several, or
        sharded when launched with an FSDP or DeepSpeed config (also as one process); else this process alone."""
        import torch
        from accelerate.utils import parse_flag_from_env

        deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
        if int(os.environ.get("WORLD_SIZE", "1")) < 2 and not (deepspeed or parse_flag_from_env("ACCELERATE_USE_FSDP")):
            return cls()
        from accelerate import Accelerator, PartialState

        from resonance.patches.fsdp_cpu import keep_fsdp_on_cpu

        keep_fsdp_on_cpu()  # accelerate drops FSDP on CPU processes (as in resonance train)
        if torch.cuda.is_available():
            return cls(Accelerator())
        if deepspeed:  # accelerate drops DeepSpeed when asked for the CPU: its CPU accelerator joins a gloo group
            PartialState(backend="gloo")
            return cls(Accelerator())
        return cls(Accelerator(cpu=True))  # without it, each process would find no GPU and run alone

    @property
    def sharded(self) -> bool:
        """Whether the weights are shards (FSDP; DeepSpeed ZeRO-3), every forward pass collective."""
        from resonance.algorithms.image_features import weights_sharded

        return weights_sharded(self.accelerator)

    def load(self, checkpoint: str) -> tuple[Any, Any, Any]:
        """``(vl_model class, model, processor)``: on this process's device, its weights sharded where the launch
        asked for it."""
        if self.accelerator is None:
            return load_for_generation(checkpoint)
        from resonance.generation import default_dtype, load_unplaced

        device = self.accelerator.device
        sharded = "weights sharded" if self.sharded else "weights whole on each"
        logger.info("generating on %d processes (%s, %s)", self.count, self.accelerator.distributed_type, sharded)
        vl_model, model, processor = load_unplaced(checkpoint, default_dtype(device.type))
        if not self.sharded:
            return vl_model, model.to(device), processor
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            from trl.models.utils import prepare_deepspeed

            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            # batch sizes the accelerate config leaves to the trainer ("auto"); DeepSpeed checks them, never uses them
            config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
            config["train_batch_size"] = self.count
            self.engine = prepare_deepspeed(model, self.accelerator)  # kept: its hooks gather the shards
            return vl_model, self.engine.module, processor
        from accelerate.utils import fsdp2_prepare_model
        from torch.distributed.fsdp import register_fsdp_forward_method

        from resonance.patches.fsdp_cpu import wrap_layers_the_model_holds

        wrap_layers_the_model_holds(model)
        # accelerate's own FSDP 2 wrapping (Accelerator.prepare would want an optimizer too), weights frozen: for
        # inference it keeps them in their dtype instead of float32 master copies
        model = fsdp2_prepare_model(self.accelerator, model.requires_grad_(False)).eval()
        # FSDP gathers the weights the root keeps (embeddings, projector, head) around the root's forward methods
        register_fsdp_forward_method(model, "generate")
        return vl_model, model, processor

    def rows(self, rows: list[dict[str, Any]], batch_size: int) -> list[list[int]]:
        """This process's batches, as row positions: rows ``index``, ``index + count``, ... in batches of
        ``batch_size``. Every process gets as many batches (the answers are gathered after each, and sharded
        weights make every forward pass collective), the last ones padded with position ``-1`` (row 0 generated,
        its answer dropped)."""
        mine = list(range(self.index, len(rows), self.count))
        mine += [-1] * (-(-len(rows) // self.count) - len(mine))
        return [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]

    def gather(self, answers: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
        """Every process's ``(position, answer)`` pairs of one round, by position (on every process)."""
        if self.accelerator is None:
            return answers
        from accelerate.utils import gather_object

        return sorted(gather_object(answers), key=lambda pair: pair[0])

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def end(self) -> None:
        """Wait for every process, then end their process group (see :func:`resonance.commands.train.end_processes`)."""
        if self.accelerator is not None:
            from resonance.commands.train import end_processes

            end_processes(self.accelerator)


class _SharedEncoder:
    """The image encoder pass of a batch without images (ImageEncodingMixin) for ``resonance generate``."""

    def __init__(self, processes: Processes, vl_model: Any, processor: Any):
        from resonance.algorithms.image_features import ImageEncodingMixin

        self.mixin = ImageEncodingMixin()
        self.mixin.accelerator = processes.accelerator
        self.mixin._bind_adapter(vl_model, processor)

    def around(self, model: Any, inputs: dict[str, Any]) -> Any:
        return self.mixin._idle_encoder(model, inputs, generation=True)


def _generate(
    model_name_or_path: str,
    data_path: str,
    target: _AtomicOutput | None,
    processes: Processes,
    batch_size: int,
    skip_invalid_rows: bool,
    seed: int | None,
    overrides: dict[str, Any] | None,
    console: Any,
    data_options: dict[str, Any],
) -> Any:
    """Check, load, generate every row into ``target`` (the first process's; None on the others); return the loaded
    rows (``read_rows``'s result)."""
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
        video_placeholder=processor_cls.video.placeholder if processor_cls.video else "<video>",
        skip_invalid=skip_invalid_rows,
        image_count=ImageCount.for_family(processor_cls, no_videos="`resonance generate` takes no video yet"),
        **data_options,
    )
    rows = loaded.rows
    vl_model, model, processor = processes.load(model_name_or_path)
    # Image placeholder tokens are never generated (unless --suppress_tokens says otherwise).
    kwargs = generation_kwargs(
        vl_model, model, {"suppress_tokens": processor.placeholder_token_ids(), **(overrides or {})}
    )
    if processes.sharded and processes.count > 1:  # as transformers does by itself for FSDP/ZeRO-3 modules
        kwargs["synced_gpus"] = True
    logger.info("generation kwargs: %s", kwargs)
    if seed is not None:
        from accelerate.utils import set_seed

        set_seed(seed, device_specific=processes.count > 1)  # one process: transformers' set_seed, as before
    copies = int(kwargs.get("num_return_sequences") or 1)
    encoder = _SharedEncoder(processes, vl_model, processor)
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=not processes.main) as progress:
        task = progress.add_task("generate", total=len(rows))
        for positions in processes.rows(rows, batch_size):
            batch = [rows[max(position, 0)] for position in positions]
            result = _generate_batch(model, processor, encoder, batch, kwargs)
            texts = [result.texts[i * copies : (i + 1) * copies] for i in range(len(batch))]  # each prompt's, in order
            answers = [
                (position, _record(row, prompt, row_texts))
                for position, row, prompt, row_texts in zip(positions, batch, result.prompts, texts, strict=True)
                if position >= 0
            ]
            answers = processes.gather(answers)
            if target is not None:
                for _, record in answers:
                    target.write(record)
            progress.advance(task, len(answers))
    return loaded


def _generate_batch(
    model: Any, processor: Any, encoder: _SharedEncoder, rows: list[dict[str, Any]], kwargs: dict[str, Any]
) -> Generation:
    """:func:`~resonance.generation.generate_batch`, with the image encoder run where the batch has no image and
    other processes may be running it (sharded weights), a LoRA output folder's adapters merged into the weights
    for the call where they can be (:func:`~resonance.generation.adapters_merged`, as rollouts decode), and each
    prompt prefilled once for its ``num_return_sequences`` answers or ``num_beams`` beams."""
    from resonance.base.collator import VLPromptCollator
    from resonance.base.model import unwrap
    from resonance.patches.shared_prefill import prefill_once

    batch = VLPromptCollator(processor)(rows)
    # generate repeats each prompt once per beam, or once per answer when it samples
    copies = int(kwargs.get("num_beams") or 1)
    copies = copies if copies > 1 else int(kwargs.get("num_return_sequences") or 1)
    with (
        encoder.around(model, batch["inputs"]),
        adapters_merged(model, "auto"),
        prefill_once(unwrap(model), copies),
    ):
        return generate_from(model, processor, batch, kwargs)


def _record(row: dict[str, Any], prompt: str, texts: list[str]) -> dict[str, Any]:
    """One output line: the row's source, its id when it has one, the prompt as rendered and its answer
    (``answer``), or its answers with ``--num_return_sequences`` above 1 (``answers``, a list)."""
    record: dict[str, Any] = {"source": row["source"]}
    if row.get("id") is not None:
        record["id"] = json.loads(row["id"])
    record["prompt"] = prompt
    if len(texts) == 1:
        record["answer"] = texts[0]
    else:
        record["answers"] = texts
    return record


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
