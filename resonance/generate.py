"""``resonance generate``: batched generation from prompt files, and :func:`generate_batch`, its reusable core.

:func:`generate_batch` is what PPO rollouts call too: canonical prompt rows (``resonance.data``, kind
``"prompt"``) in, the answers' texts and token ids out. The processor runs in inference mode (left padding),
so every row of a batch continues at the same position and a batch generates what each row would alone.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("resonance")

EXIT_OK = 0
EXIT_FAILED = 1  # the output exists (without --overwrite)
EXIT_INPUT = 2  # bad data, checkpoint or flags


class GenerateError(ValueError):
    """A problem with the command's input (flags, output path); the message says what to do."""

    exit_code = EXIT_INPUT


class OutputExistsError(GenerateError):
    """The output file exists and --overwrite was not given."""

    exit_code = EXIT_FAILED


@dataclass
class Generation:
    """What :func:`generate_batch` returns, one entry per row in the order given.

    ``token_ids`` are the answer's tokens: the new tokens through the first end-of-sequence token, without
    the padding ``generate`` adds after it. ``texts`` are those tokens decoded with special tokens skipped,
    stripped of surrounding white space. ``sequences`` is ``generate``'s output (the left-padded prompts,
    then the new tokens) and ``inputs`` the processor's batch, on the model's device: what PPO scores.
    """

    prompts: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    sequences: torch.Tensor
    inputs: Any


# ------------------------------------------------------------------------------------------- core


def _eos_ids(generation_kwargs: dict[str, Any], model: Any) -> set[int]:
    eos = generation_kwargs.get("eos_token_id", getattr(model.generation_config, "eos_token_id", None))
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(token) for token in eos}


def _to_model(inputs: Any, model: Any) -> Any:
    """The batch on the model's device, floating tensors (pixel values) in the model's dtype."""
    parameter = next(model.parameters())
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            dtype = parameter.dtype if value.is_floating_point() else value.dtype
            inputs[key] = value.to(device=parameter.device, dtype=dtype)
    return inputs


def generate_batch(
    model: Any,
    vl_processor: Any,
    vl_model: Any,
    rows: Sequence[dict[str, Any]],
    generation_kwargs: dict[str, Any],
) -> Generation:
    """Generate an answer for each canonical prompt row (``{"prompt": [Message], "images": [path], ...}``).

    ``model`` is the loaded model (a PEFT model too), ``vl_processor`` the family's processor instance,
    ``vl_model`` the family's model adapter class (unused today; the PPO trainer's signature), and
    ``generation_kwargs`` go to ``model.generate`` as they are (see :func:`generation_kwargs`). The prompts go
    through :class:`~resonance.base.collator.VLPromptCollator` (inference mode, left padding), then
    :func:`generate_from`.
    """
    del vl_model  # every family generates through model.generate; kept for a uniform adapter signature
    from resonance.base.collator import VLPromptCollator

    if not rows:
        raise ValueError("generate_batch: no rows")
    return generate_from(model, vl_processor, VLPromptCollator(vl_processor)(list(rows)), generation_kwargs)


def generate_from(
    model: Any, vl_processor: Any, batch: dict[str, Any], generation_kwargs: dict[str, Any]
) -> Generation:
    """Generate from a prompt batch of :class:`~resonance.base.collator.VLPromptCollator` (its ``inputs`` are moved
    to the model's device and dtype in place). The model runs in eval mode and under ``no_grad`` for the call."""
    inputs = _to_model(batch["inputs"], model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sequences = model.generate(**inputs, **generation_kwargs)
    finally:
        model.train(was_training)
    new_tokens = sequences[:, inputs["input_ids"].shape[1] :].tolist()
    eos = _eos_ids(generation_kwargs, model)
    token_ids = []
    for tokens in new_tokens:
        end = next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))
        token_ids.append(tokens[:end])
    tokenizer = vl_processor.tokenizer
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
    return Generation(prompts=batch["prompts"], texts=texts, token_ids=token_ids, sequences=sequences, inputs=inputs)


def generation_kwargs(vl_model: Any, model: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The family's defaults (spec ``generation``, with the model's special token ids), then ``overrides``."""
    kwargs = vl_model.prepare_default_generation_kwargs(model.generation_config)
    kwargs.update(overrides or {})
    return kwargs


# ------------------------------------------------------------------------------- command-line flags


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
            raise GenerateError(f"unexpected argument {flag!r}; generation settings are written --name value")
        name, has_value, value = flag[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            match = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean --{match[0]}?" if match else " (see transformers.GenerationConfig)"
            raise GenerateError(f"unknown option --{name}: not a generation setting{hint}")
        if not has_value:
            if not args or args[0].startswith("--"):
                raise GenerateError(f"--{name} needs a value")
            value = args.pop(0)
        overrides[name] = _parse_value(value)
    return overrides


# ------------------------------------------------------------------------------------------ loading


def _processor_path(checkpoint: Path) -> Path:
    """The checkpoint itself, or for a LoRA output folder saved without its processor, the base model."""
    adapter = checkpoint / "adapter_config.json"
    has_processor = any((checkpoint / name).is_file() for name in ("processor_config.json", "tokenizer_config.json"))
    if adapter.is_file() and not has_processor:
        return Path(json.loads(adapter.read_text())["base_model_name_or_path"])
    return checkpoint


def load_for_generation(checkpoint: str | Path, device: str | None = None) -> tuple[Any, Any, Any]:
    """``(vl_model class, model, processor)`` for a base checkpoint or a LoRA output folder.

    bf16 on CUDA when available, fp32 on CPU; the model is in eval mode, the processor in inference mode.
    """
    from resonance.utils.auto_load import load_core_mapper
    from resonance.utils.compat import install_video_processor_optional

    install_video_processor_optional()  # Qwen-VL processors load without torchvision (no-op where it exists)
    checkpoint = Path(checkpoint)
    mapper = load_core_mapper(checkpoint)
    vl_model = mapper.model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = vl_model.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    processor = mapper.processor(_processor_path(checkpoint), trust_remote_code=vl_model.trust_remote_code)
    processor.infer()
    return vl_model, model, processor


# ------------------------------------------------------------------------------------------ command


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

    Returns the number of rows written. Raises :class:`GenerateError`, ``DataError`` or ``RowError`` before
    anything is written; the output appears only once every row is done.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from resonance.data import read_rows
    from resonance.utils.auto_load import load_core_mapper

    output = Path(output)
    if batch_size < 1:
        raise GenerateError(f"--batch_size must be at least 1, got {batch_size}")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
    if output.exists() and not output.is_file():
        raise GenerateError(f"{output} exists and is not a file")
    if not output.parent.is_dir():
        raise GenerateError(f"{output.parent}: no such folder for the output")
    mapper = load_core_mapper(model_name_or_path)  # an unsupported checkpoint fails before the data is read
    processor_cls = mapper.processor
    # Data before the model: a bad row should fail in a second, naming its FILE:LINE.
    loaded = read_rows(
        data_path,
        "prompt",
        image_placeholder=processor_cls.image_placeholder,
        skip_invalid=skip_invalid_rows,
        min_images=1 if processor_cls.images_required else 0,
        max_images=None if processor_cls.multi_image else 1,
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
    from resonance.base.collator import RowError
    from resonance.data import DataError
    from resonance.utils.auto_load import UnsupportedModelError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_generation_overrides(extra_args)
        run(model_name_or_path, data_path, output, overrides=overrides, **options)
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (DataError, RowError, UnsupportedModelError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    return EXIT_OK
