"""Resonance's one exception tree and its exit codes (stdlib only).

Every error a user can fix derives from :class:`ResonanceError`; its message names the file, row, field or
flag and says what would be right. Commands catch ``ResonanceError`` alone (and, through :func:`user_error`, one
raised in a DataLoader worker) and exit with its ``exit_code``; anything else is a bug: :func:`resonance.cli.main`
prints its traceback and exits with ``EXIT_INTERNAL``, so CI can tell a crash from drift or from bad input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# -- exit codes (every command) -------------------------------------------------------------------------

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and found a problem: drift, a failed verify check, an existing output
EXIT_INPUT = 2  # the input is wrong: a spec, data, a flag, a checkpoint, a reward function
EXIT_INTERNAL = 3  # a bug in Resonance or a library it calls: the traceback is printed; please report it
EXIT_INTERRUPTED = 130  # Ctrl-C (the shell's convention: 128 + SIGINT)

MAX_LISTED_ERRORS = 20  # problems shown in one message; the rest are counted


class ResonanceError(Exception):
    """A problem with the user's input; ``str()`` says where and what would be right."""

    exit_code = EXIT_INPUT


# -- compile time: specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecProblem:
    """One problem at a place in a spec file."""

    file: str
    line: int
    col: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.field or '<spec>'}: {self.message}"


class SpecError(ResonanceError, ValueError):
    """One or more problems in spec files; ``str()`` lists them one per line."""

    def __init__(self, problems: list[SpecProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class FieldProblem:
    """One spec field that does not fit the loaded model or processor (no position yet: the adapter knows
    only its spec's name; ``resonance verify`` maps the field to its line)."""

    field: str  # dotted, list indexes as numbers: image.inputs.1.name
    message: str


class SpecMismatchError(ResonanceError, ValueError):
    """The spec does not fit the loaded model or processor; the message names the spec file and fields."""

    def __init__(self, spec_file: str, problems: list[FieldProblem]):
        self.problems = problems
        lines = [f"{spec_file}: {p.field}: {p.message}" for p in problems]
        super().__init__("the spec does not fit the checkpoint:\n  " + "\n  ".join(lines))


# -- run time: checkpoints, data, flags, rewards, outputs -------------------------------------------------


class UnsupportedModelError(ResonanceError, ValueError):
    """The checkpoint's architecture has no adapter, or the adapter cannot run the asked algorithm."""


class MissingBackendError(ResonanceError, ImportError):
    """A class a spec names (its processor, image or video processor) needs a package that is not installed.

    ``where`` is the spec and field that name the class (``specs/x.yaml: processor_class``), or empty where the
    caller adds the position itself (``resonance tiny`` and ``verify`` give the line)."""

    def __init__(self, where: str, class_name: str, package: str):
        self.where, self.class_name, self.package = where, class_name, package
        prefix = f"{where}: " if where else ""
        super().__init__(
            f"{prefix}{class_name} needs the {package} package, which is not installed here (pip install {package})"
        )

    def __reduce__(self) -> tuple[type[MissingBackendError], tuple[str, str, str]]:
        return (type(self), (self.where, self.class_name, self.package))


class CheckpointError(ResonanceError, FileNotFoundError):
    """A checkpoint or model folder that is missing or incomplete."""


class DataError(ResonanceError, ValueError):
    """Invalid data; ``errors`` holds every ``(source, message)``, ``str()`` lists the first ones."""

    def __init__(self, errors: list[tuple[str, str]], header: str | None = None):
        self.errors = list(errors)
        self.header = header
        lines = [header] if header else []
        lines += [f"{source}: {message}" for source, message in self.errors[:MAX_LISTED_ERRORS]]
        if len(self.errors) > MAX_LISTED_ERRORS:
            lines.append(f"... and {len(self.errors) - MAX_LISTED_ERRORS} more")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[type[DataError], tuple[list[tuple[str, str]], str | None]]:
        return (type(self), (self.errors, self.header))


class RowError(ResonanceError, ValueError):
    """A dataset row that cannot be used, found while batching; the message names its file and line."""


class ConfigError(ResonanceError, ValueError):
    """Flags that do not make a run; the message names the flag."""


class RewardFunctionError(ResonanceError, ValueError):
    """A reward function that cannot be loaded, raised, or returned something that is not one finite number per
    completion. The message names the function (and ``--reward_funcs``) and, for bad values, the row."""


class ChatTemplateError(ResonanceError, ValueError):
    """A chat template that cannot render a conversation: a syntax error, a sandbox violation, no output, or
    over its time or size budget. The message names the template's source (spec or checkpoint)."""


class TrainingError(ResonanceError, RuntimeError):
    """The run started but cannot go on or finish: a non-finite loss or weight, a save that failed. The message
    says what happened, at which step, and where anything already trained was kept."""

    exit_code = EXIT_FAILED


class OutputExistsError(ResonanceError, FileExistsError):
    """The output exists and --overwrite was not given."""

    exit_code = EXIT_FAILED


# -- errors raised in DataLoader worker processes ---------------------------------------------------------------

# torch re-raises a worker's exception in the loading process as ``type(message)``, where the message is this line
# and the worker's traceback as text; a type that cannot be built from one string (DataError) becomes a RuntimeError
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


class WorkerError(ResonanceError):
    """A :class:`ResonanceError` raised in a DataLoader worker process (collating a batch: an unreadable image, a row
    too long), with its own message and exit code, and without the worker's traceback."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _subclasses(cls: type) -> list[type]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


def user_error(exc: BaseException) -> ResonanceError | None:
    """The :class:`ResonanceError` to report for ``exc``: ``exc`` itself, or the one a DataLoader worker raised
    (rebuilt from torch's copy of it: the type's name and the worker's traceback text); None for anything else."""
    text = str(exc)
    match = _WORKER_ERROR.match(text)
    if match is None:
        return exc if isinstance(exc, ResonanceError) else None
    found = [cls for cls in _subclasses(ResonanceError) if cls.__name__ == match[1]]
    if len(found) != 1:
        return None
    (cls,) = found
    last_line = f"{cls.__module__}.{cls.__qualname__}: "  # the traceback's last exception: the one raised
    at = text.rfind(last_line)
    if at < 0:
        return None
    return WorkerError(text[at + len(last_line) :].rstrip("\n"), cls.exit_code)
