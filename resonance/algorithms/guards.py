"""What every algorithm's run shares from start to save: the output folder checked before anything loads, the
checkpoint to resume from (complete ones only), checkpoints written whole or not at all, training stopped on a
non-finite loss or weight, and a final save that keeps the weights somewhere when the output folder fails and
otherwise leaves a folder other tools load (adapters that find their base from anywhere, files others can read)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from resonance.errors import CheckpointError, ConfigError, OutputExistsError, TrainingError

logger = logging.getLogger("resonance")

# Written last into every checkpoint (transformers' Trainer and PPO alike): a checkpoint without it is incomplete.
TRAINER_STATE = "trainer_state.json"
# Checkpoints are written under this folder of --output_dir and renamed into place when complete.
STAGING = ".partial"
_PROBE_PREFIX = ".resonance-write-test-"
_RESUME_LAST = ("true", "last")


# -- the output folder ------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: str | Path, *, overwrite: bool, resume: str | None, remove_old: bool) -> Path:
    """Check ``--output_dir`` before any model loads: a folder (created when missing) this process can write to,
    and empty unless ``--overwrite_output_dir`` or ``--resume_from_checkpoint`` is given. With
    ``--overwrite_output_dir`` and no resume, the ``checkpoint-*`` folders of an earlier run are removed (where
    ``remove_old``: the process that saves), so a later resume or checkpoint rotation cannot mix the two runs."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {path}: is a file, not a folder; name a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=_PROBE_PREFIX):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--output_dir {path}: cannot write there ({exc.strerror or exc}); name a folder you can write to"
        ) from None
    existing = sorted(p.name for p in path.iterdir() if not p.name.startswith(_PROBE_PREFIX))
    if existing and not (overwrite or resume):
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise OutputExistsError(
            f"--output_dir {path}: not empty ({shown}); name a new folder, add --overwrite_output_dir true to "
            "train into it anyway, or --resume_from_checkpoint true to continue the run saved there"
        )
    if overwrite and not resume and remove_old:
        for old in [*_checkpoint_folders(path), path / STAGING]:
            if old.is_dir():
                shutil.rmtree(old)
                logger.info("--overwrite_output_dir: removed %s from an earlier run", old)
    return path


# -- resuming ---------------------------------------------------------------------------------------------


def _step_of(folder: Path) -> int | None:
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    number = folder.name[len(prefix) :]
    return int(number) if folder.name.startswith(prefix) and number.isdigit() else None


def _checkpoint_folders(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders, by step."""
    folders = [p for p in output_dir.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(folders, key=_step_of)


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint whose trainer state (written last) is there and reads as JSON."""
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` of ``output_dir`` with the highest step, or None. Unlike transformers'
    ``get_last_checkpoint``, a folder without its trainer state (a write cut short) is passed over, with a
    warning."""
    path = Path(output_dir)
    if not path.is_dir():
        return None
    for folder in reversed(_checkpoint_folders(path)):
        if is_complete(folder):
            return folder
        logger.warning("%s: incomplete (no readable %s), not resumed from", folder, TRAINER_STATE)
    return None


def resolve_resume(resume: str | bool | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names: ``true`` (or ``last``) is the last complete one in
    ``output_dir``; a path must be a complete checkpoint. None when no resume is asked for."""
    if resume is None or resume is False or str(resume).lower() in ("", "false", "none"):
        return None
    if resume is True or str(resume).lower() in _RESUME_LAST:
        found = last_checkpoint(output_dir)
        if found is None:
            raise CheckpointError(
                f"--resume_from_checkpoint {str(resume).lower()}: no complete {PREFIX_CHECKPOINT_DIR}-<step> folder "
                f"in {output_dir}; name a checkpoint folder, or leave the flag out to start afresh"
            )
        return found
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {path}: no such folder")
    if not is_complete(path):
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: not a complete checkpoint (no readable {TRAINER_STATE}); name a "
            f"{PREFIX_CHECKPOINT_DIR}-<step> folder that a run saved"
        )
    return path


def check_steps_left(checkpoint: Path, max_steps: int) -> None:
    """Refuse a resume with nothing left to train (its step at or past ``--max_steps``): the run would save the
    checkpoint's weights as its result."""
    step = json.loads((checkpoint / TRAINER_STATE).read_text()).get("global_step", 0)
    if max_steps > 0 and step >= max_steps:
        raise ConfigError(
            f"--resume_from_checkpoint {checkpoint}: already at step {step}, and --max_steps is {max_steps}: "
            "nothing left to train; raise --max_steps, or use that checkpoint as it is"
        )


def check_checkpoint_strategy(checkpoint: Path) -> None:
    """Refuse a Trainer checkpoint whose optimizer state this run cannot read. transformers reads DeepSpeed's (one
    ZeRO partition a process, ``global_step*/``) only under DeepSpeed on as many processes, FSDP's
    (``pytorch_model_fsdp*``, ``optimizer*.bin``, ``optimizer_0/``) only under FSDP, and ``optimizer.pt`` only under
    neither; otherwise it fails inside the Trainer or, from DeepSpeed to neither, silently starts a fresh optimizer
    and learning-rate schedule. The strategy running is the launch's (``accelerate launch`` sets it in the
    environment): known before anything loads."""
    from accelerate.utils import parse_flag_from_env

    partitions = sorted(checkpoint.glob("global_step*/*optim_states.pt"))
    fsdp_files = [*checkpoint.glob("pytorch_model_fsdp*"), *checkpoint.glob("optimizer*.bin")]
    if partitions:
        saved = "DeepSpeed"
    elif fsdp_files or (checkpoint / "optimizer_0").is_dir():
        saved = "FSDP"
    elif (checkpoint / "optimizer.pt").is_file():
        saved = "neither FSDP nor DeepSpeed"
    else:
        return  # no optimizer state (--save_only_model), or PPO's own format (checked where it loads)
    running = (
        "DeepSpeed"
        if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
        else "FSDP"
        if parse_flag_from_env("ACCELERATE_USE_FSDP")
        else "neither FSDP nor DeepSpeed"
    )
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if saved == running and (not partitions or len(partitions) == processes):
        return
    where = f" on {len(partitions)} processes" if partitions else ""
    raise CheckpointError(
        f"--resume_from_checkpoint {checkpoint}: its optimizer state was saved under {saved}{where}, and this run "
        f"is under {running} on {processes} process(es), which cannot read it: resume with the accelerate config "
        "(and --num_processes) that saved it, or start a new run from its weights"
    )


# -- checkpoints written whole ----------------------------------------------------------------------------


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move a completely written checkpoint from its staging folder to its final name (one rename), its adapters
    naming their base by absolute path and its files readable by others, as the output's are at the end
    (:func:`finish_output`), so that other tools and accounts can load it while the run goes on."""
    absolute_base_paths(staged)
    make_readable(staged)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()  # the staging folder, when nothing else is staged


def discard_staged(staged: Path) -> None:
    """Remove a checkpoint whose writing failed, and its staging folder when nothing else is staged."""
    shutil.rmtree(staged, ignore_errors=True)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()


class WholeCheckpoints:
    """A transformers ``Trainer`` mixin: each ``checkpoint-<step>`` is written under ``output_dir/.partial`` and
    renamed into place when complete, so a run killed mid-write leaves no half checkpoint that a resume (ours, or
    transformers' ``get_last_checkpoint``) would pick. A checkpoint that cannot be written (disk full, folder no
    longer writable) stops the run with a :class:`TrainingError` after the weights were kept elsewhere."""

    _staging_dir: Path | None = None

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' upload of --output_dir (at the end of ``save_model`` with --push_to_hub), of the folder as
        the run leaves it (:func:`finish_output`) rather than as ``save_pretrained`` wrote it."""
        if self.args.should_save:
            finish_output(Path(self.args.output_dir))
        return super().push_to_hub(*args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_dir is not None:
            return str(self._staging_dir)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING
        if self.args.should_save:
            shutil.rmtree(staging / name, ignore_errors=True)  # left by a run killed while writing it
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        except OSError as exc:
            discard_staged(staging / name)
            what = f"step {self.state.global_step}: checkpoint {run_dir / name}"
            raise save_failed(what, run_dir, exc, self.save_model) from None
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staging / name, run_dir / name)
            best = self.state.best_model_checkpoint
            if best is not None and Path(best).parent == staging:  # the best is this step: its final name
                self.state.best_model_checkpoint = str(run_dir / name)
                self.state.save_to_json(str(run_dir / name / TRAINER_STATE))
            # transformers rotated inside the staging folder; the same rotation over the real checkpoints:
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


# -- saving the result ------------------------------------------------------------------------------------


def rescue_dir(output_dir: Path) -> Path:
    """A fresh folder for weights that could not be saved to ``output_dir``: next to it, else in the temp dir."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for parent in (output_dir.resolve().parent, Path(tempfile.gettempdir())):
        try:
            return Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.rescued-{stamp}-", dir=parent))
        except OSError:
            continue
    raise OSError(errno.ENOSPC, "no folder to keep the weights in, next to the output or in the temp dir")


def save_failed(what: str, output_dir: Path, exc: OSError, save: Callable[[str], None]) -> TrainingError:
    """The error for a failed save of ``what`` into ``output_dir``, after keeping the weights with ``save`` in a
    rescue folder (:func:`rescue_dir`)."""
    reason = exc.strerror or str(exc)
    try:
        kept = rescue_dir(output_dir)
        save(str(kept))
    except OSError as second:
        return TrainingError(
            f"{what}: could not be saved ({reason}), and no other folder could take the weights "
            f"({second.strerror or second}): nothing was kept"
        )
    return TrainingError(f"{what}: could not be saved ({reason}); the trained weights were kept in {kept}")


def save_result(output_dir: Path, save: Callable[[str], None], rescue: Callable[[str], None]) -> None:
    """``save(output_dir)``, then (in the process that saves) :func:`finish_output`; where the save fails (disk
    full, folder no longer writable), ``rescue`` into a folder next to it (or in the temp dir) and raise a
    :class:`TrainingError` that says where the weights are."""
    from accelerate import PartialState

    try:
        save(str(output_dir))
        if PartialState().is_main_process:
            finish_output(output_dir)
    except OSError as exc:
        raise save_failed(f"--output_dir {output_dir}", output_dir, exc, rescue) from None


# -- an output folder any tool reads -----------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's description of a saved adapter


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def make_readable(folder: Path) -> None:
    """Give every file under ``folder`` at least the mode a new file gets (:func:`new_file_mode`, 0644 under the
    usual umask): safetensors writes its files 0600, which other accounts, containers and serving tools that
    read a shared output folder cannot open."""
    wanted = new_file_mode()
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            mode = file.stat().st_mode & 0o7777
            if mode | wanted != mode:
                file.chmod(mode | wanted)


def _rewrite_json(file: Path, values: dict[str, Any]) -> None:
    """Replace ``values`` in a JSON object file (written whole: a temporary file renamed onto it)."""
    content = {**json.loads(file.read_text(encoding="utf-8")), **values}
    staged = file.with_name(f".{file.name}.tmp")
    staged.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staged, file)


def absolute_base_paths(folder: Path) -> None:
    """In every ``adapter_config.json`` under ``folder``, a ``base_model_name_or_path`` that names a local folder
    (as given on the command line: relative to where training ran) becomes its absolute path, so the adapter
    loads from any working directory; a Hub id stays as it is."""
    for config_file in folder.rglob(ADAPTER_CONFIG):
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if isinstance(base, str) and base and not Path(base).is_absolute() and Path(base).is_dir():
            _rewrite_json(config_file, {"base_model_name_or_path": str(Path(base).resolve())})


def auto_loadable_adapter(folder: Path) -> None:
    """Let ``peft.AutoPeftModel.from_pretrained(folder)`` load the adapter saved at the top of ``folder``.

    PEFT 0.21 has no auto class for image-text-to-text models (``AutoPeftModelForCausalLM`` builds
    ``AutoModelForCausalLM``, which refuses VLM configs), and transformers 5's own adapter loading asks for
    PEFT >= 0.22. ``AutoPeftModel`` builds the base model from the config's ``auto_mapping`` (the checkpoint's
    transformers class) where ``task_type`` is unset; the adapter weights and everything else are unchanged."""
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        return
    import transformers

    from resonance.base.registry import checkpoint_architecture

    architecture = checkpoint_architecture(folder)
    if not hasattr(transformers, architecture):
        return
    mapping = {"base_model_class": architecture, "parent_library": "transformers"}
    _rewrite_json(config_file, {"task_type": None, "auto_mapping": mapping})


def finish_output(folder: Path) -> None:
    """What a saved output folder needs beyond ``save_pretrained``: adapters that find their base model from any
    working directory (:func:`absolute_base_paths`) and load through ``peft.AutoPeftModel``
    (:func:`auto_loadable_adapter`), and files other tools can read (:func:`make_readable`)."""
    absolute_base_paths(folder)
    auto_loadable_adapter(folder)
    make_readable(folder)


# -- non-finite training ----------------------------------------------------------------------------------


def non_finite_weights(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the trainable tensors holding a NaN or an infinity (one device sync for all of them)."""
    trained = [(name, p) for name, p in named_parameters if p.requires_grad]
    if not trained:
        return []
    finite = torch.stack([_whole(torch.isfinite(p.detach()).all()) for _, p in trained]).cpu().tolist()
    return [name for (name, _), ok in zip(trained, finite, strict=True) if not ok]


def _whole(flag: torch.Tensor) -> torch.Tensor:
    """A flag computed on a sharded parameter (FSDP2's DTensor), over all its shards: every process calls this,
    as every process runs the guard."""
    from torch.distributed.tensor import DTensor

    return flag.full_tensor() if isinstance(flag, DTensor) else flag


_STOPPED = (
    "training stopped, this step was not saved. Lower --learning_rate (or check the data and rewards), then start "
    "again or resume from a checkpoint saved before it"
)


def check_finite(step: int, named_parameters: Iterable[tuple[str, torch.Tensor]], values: dict[str, float]) -> None:
    """Raise :class:`TrainingError` when a logged loss value or a trainable weight is not finite after ``step``."""
    for name, value in values.items():
        if isinstance(value, int | float) and not math.isfinite(value):
            raise TrainingError(f"step {step}: {name} is {value}; {_STOPPED}")
    bad = non_finite_weights(named_parameters)
    if bad:
        raise TrainingError(
            f"step {step}: {len(bad)} trainable weight tensor(s) hold NaN or infinity (first: {bad[0]}); {_STOPPED}"
        )


class NonFiniteGuard(TrainerCallback):
    """Stops a transformers/TRL run with a :class:`TrainingError` when the logged loss or a trainable weight becomes
    NaN or infinite: weights after every optimizer step (before that step can be checkpointed), losses when logged."""

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            check_finite(state.global_step, model.named_parameters(), {})

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:  # the training loss (an evaluation's loss may be NaN with no labelled token)
            check_finite(state.global_step, (), {"the training loss": logs["loss"]})
