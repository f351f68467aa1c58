"""``resonance export OUT --to DIR``: a training output as a folder that plain transformers loads.

A LoRA output's adapter is merged into its base model's weights (PEFT's ``merge_and_unload``) and saved with the
processor, so ``AutoModelForImageTextToText.from_pretrained(DIR)`` and ``AutoProcessor.from_pretrained(DIR)`` load
it without Resonance or PEFT. A reward model (``train rm``) or a policy with its value head (``train ppo``) keeps
its head: the merged backbone, the head file and its JSON description, which ``VLRewardModel.from_pretrained`` /
``VLModelWithValueHead.from_pretrained`` load (and whose backbone plain transformers loads alone). A full-training
output has nothing to merge and is copied as it is. DIR is written whole: a temporary folder next to it, renamed
into place when complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resonance.algorithms.guards import ADAPTER_CONFIG, STAGING, current_umask, make_readable
from resonance.base.registry import (
    ModelCoreMapper,
    check_processor_files,
    check_weights,
    checkpoint_folder,
    load_core_mapper,
    lora_base_checkpoint,
    processor_checkpoint,
)
from resonance.base.reward import REWARD_CONFIG
from resonance.base.value import VALUE_CONFIG
from resonance.errors import CheckpointError, ConfigError, OutputExistsError

logger = logging.getLogger("resonance")

# What a full-training output holds besides the model that the exported folder leaves out.
NOT_EXPORTED = ("checkpoint-*", STAGING, ".*", "training_args.bin")


def check_output_folder(output: Path) -> str:
    """What ``output`` holds: ``"lora"`` (an adapter to merge) or ``"full"`` (weights to copy); a
    :class:`CheckpointError` saying what a Resonance output holds when it is neither."""
    if not output.is_dir():
        raise CheckpointError(f"{output}: no such folder; name the --output_dir of a `resonance train` run")
    if (output / ADAPTER_CONFIG).is_file():
        base = str(lora_base_checkpoint(output))
        checkpoint_folder(base, named_by=f"{output / ADAPTER_CONFIG}: base_model_name_or_path")
        kind = "lora"
    elif (output / "config.json").is_file():
        check_weights(output)
        kind = "full"
    else:
        raise CheckpointError(
            f"{output}: not a Resonance training output: it holds neither {ADAPTER_CONFIG} (a LoRA run) nor "
            "config.json with weights (full training); name the --output_dir of a `resonance train` run"
        )
    check_processor_files(processor_checkpoint(output))
    return kind


def check_destination(output: Path, to: Path, overwrite: bool) -> None:
    """``--to`` must be new (or ``overwrite``) and lie outside the output folder."""
    if to.resolve() == output.resolve() or output.resolve() in to.resolve().parents:
        raise ConfigError(f"--to {to}: inside the output folder {output}; name a folder outside it")
    if to.exists() and not overwrite:
        raise OutputExistsError(f"--to {to}: exists; name a new folder, or pass --overwrite to replace it")


@contextlib.contextmanager
def staged_folder(to: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh folder next to ``to`` to write into; renamed onto ``to`` when the block ends without an error (an
    existing ``to`` replaced where ``overwrite``), removed otherwise."""
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{to.name}.", suffix=".partial", dir=to.parent))
    except OSError as exc:
        raise ConfigError(
            f"--to {to}: cannot write in {to.parent} ({exc.strerror}); name a folder you can write to"
        ) from None
    try:
        yield staged
        staged.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; an ordinary folder instead
        make_readable(staged)
        if to.exists() and not overwrite:  # appeared meanwhile: never replace without --overwrite
            raise OutputExistsError(f"--to {to}: exists (created while exporting); pass --overwrite to replace it")
        if to.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{to.name}.", suffix=".old", dir=to.parent))
            os.replace(to, old / to.name)
            os.replace(staged, to)
            shutil.rmtree(old)
        else:
            os.replace(staged, to)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _merged_model(output: Path, mapper: ModelCoreMapper) -> Any:
    """The output's model with its adapter merged: a plain transformers model, or (reward model, value head) a
    Resonance head model whose backbone is one."""
    head_class = None
    if (output / REWARD_CONFIG).is_file():
        head_class = mapper.reward_model
    elif (output / VALUE_CONFIG).is_file():
        head_class = mapper.value_model
    if head_class is None:
        return mapper.model.from_pretrained(output, dtype="auto").merge_and_unload()
    model = head_class.from_pretrained(output, dtype="auto")
    model.model = model.model.merge_and_unload()
    return model


def export(output: Path, to: Path, overwrite: bool = False) -> str:
    """Write ``output`` (a ``resonance train`` output folder) to ``to`` as plain transformers loads it; returns
    what was done, in words."""
    kind = check_output_folder(output)
    check_destination(output, to, overwrite)
    if kind == "full":
        with staged_folder(to, overwrite) as staged:
            shutil.copytree(output, staged, ignore=shutil.ignore_patterns(*NOT_EXPORTED), dirs_exist_ok=True)
        return f"{output}: full weights, nothing to merge; copied to {to}"
    mapper = load_core_mapper(output)
    processor = mapper.processor(processor_checkpoint(output), trust_remote_code=mapper.model.trust_remote_code)
    model = _merged_model(output, mapper)
    with staged_folder(to, overwrite) as staged:
        model.save_pretrained(staged)
        processor.hf.save_pretrained(str(staged))
    return f"{output}: merged the LoRA adapter into {lora_base_checkpoint(output)}; saved to {to}"


def main(output: Path, to: Path, overwrite: bool = False) -> None:
    """``resonance export``: log what was written (errors are :class:`~resonance.errors.ResonanceError`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.info("%s", export(output, to, overwrite))
