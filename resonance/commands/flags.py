"""The flags of ``resonance train X`` and ``resonance generate``: read by the libraries' own parsers (argparse through
transformers' ``HfArgumentParser``; ``GenerationConfig``'s fields), then checked against one table of valid values
(:data:`TRAIN_RANGES`, :data:`GENERATION_RANGES`) and a few checks across flags. Every unknown flag (with
did-you-mean) and every invalid value is reported in one :class:`~resonance.errors.ConfigError` (exit 2), before any
data or model loads.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resonance.algorithms.quantization import quantization_problems
from resonance.errors import MAX_LISTED_ERRORS, ConfigError

# -- valid values -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The valid values of one flag: ``ok(value)`` says whether a value is one, ``expect`` says which are."""

    ok: Callable[[Any], bool]
    expect: str


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low: int) -> Range:
    return Range(lambda v: _number(v) and v >= low, f"a whole number >= {low}")


def _between(low: float, high: float, shown: str) -> Range:
    """``shown`` is the interval in math notation; a closed end is written ``[``/``]``, an open one ``(``/``)``."""
    closed_low, closed_high = shown.startswith("["), shown.endswith("]")
    return Range(
        lambda v: _number(v) and (low <= v if closed_low else low < v) and (v <= high if closed_high else v < high),
        f"a number in {shown}",
    )


AT_LEAST_0 = _at_least(0)
AT_LEAST_1 = _at_least(1)
POSITIVE = Range(lambda v: _number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Range(lambda v: _number(v) and v >= 0, "a finite number >= 0")
FINITE = Range(_number, "a finite number")
PROBABILITY = _between(0, 1, "[0, 1)")  # dropout-like: 1 would drop everything
FRACTION = _between(0, 1, "[0, 1]")
STEPS = Range(lambda v: _number(v) and (v == -1 or v >= 1), "a whole number >= 1, or -1 to train --num_train_epochs")

# Flag -> its valid values, for every algorithm that has the flag (None, an optional flag left out, is always valid).
TRAIN_RANGES: dict[str, Range] = {
    # transformers.TrainingArguments
    "per_device_train_batch_size": AT_LEAST_1,
    "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "eval_accumulation_steps": AT_LEAST_1,
    "learning_rate": POSITIVE,
    "max_steps": STEPS,
    "num_train_epochs": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": PROBABILITY,
    "adam_beta2": PROBABILITY,
    "adam_epsilon": POSITIVE,
    "max_grad_norm": Range(NON_NEGATIVE.ok, "a finite number >= 0 (0 turns clipping off)"),
    "warmup_steps": NON_NEGATIVE,
    "label_smoothing_factor": PROBABILITY,
    "neftune_noise_alpha": POSITIVE,
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "dataloader_num_workers": AT_LEAST_0,
    # resonance.algorithms.arguments.ModelArguments
    "lora_r": AT_LEAST_1,
    "lora_alpha": POSITIVE,
    "lora_dropout": PROBABILITY,
    # TRL's configs and ours: lengths and sampling
    "max_length": AT_LEAST_1,
    "max_completion_length": AT_LEAST_1,
    "response_length": AT_LEAST_1,
    "num_generations": Range(lambda v: _number(v) and v >= 2, "a whole number >= 2 (GRPO compares answers in a group)"),
    "num_iterations": AT_LEAST_1,
    "num_ppo_epochs": AT_LEAST_1,
    "num_mini_batches": AT_LEAST_1,
    "temperature": POSITIVE,
    "top_p": _between(0, 1, "(0, 1]"),
    "top_k": Range(AT_LEAST_0.ok, "a whole number >= 0 (0 turns top-k off)"),
    "repetition_penalty": POSITIVE,
    # losses
    "label_smoothing": _between(0, 0.5, "[0, 0.5)"),
    "epsilon": POSITIVE,
    "kl_coef": NON_NEGATIVE,
    "gamma": FRACTION,
    "lam": FRACTION,
    "cliprange": POSITIVE,
    "cliprange_value": POSITIVE,
    "vf_coef": NON_NEGATIVE,
    "missing_eos_penalty": FINITE,
    # reward functions and images (checked again where they are used, for callers that skip the flags)
    "reward_timeout": Range(NON_NEGATIVE.ok, "a number of seconds >= 0 (0: no limit)"),
    "max_image_pixels": Range(AT_LEAST_0.ok, "a whole number of pixels >= 0 (0: no limit)"),
}

# Where one name means different things: DPO's beta scales the whole loss; GRPO's weighs a KL term it may leave out.
ALGORITHM_RANGES: dict[str, dict[str, Range]] = {
    "dpo": {"beta": POSITIVE},
    "grpo": {"beta": Range(NON_NEGATIVE.ok, "a finite number >= 0 (0 leaves the KL term out)")},
}

# resonance generate: transformers.GenerationConfig fields.
GENERATION_RANGES: dict[str, Range] = {
    "max_new_tokens": AT_LEAST_1,
    "min_new_tokens": AT_LEAST_0,
    "max_length": AT_LEAST_1,
    "num_beams": AT_LEAST_1,
    "top_p": _between(0, 1, "(0, 1]"),
    "top_k": AT_LEAST_0,
    "min_p": FRACTION,
    "typical_p": _between(0, 1, "(0, 1]"),
    "repetition_penalty": POSITIVE,
    "length_penalty": FINITE,
    "num_return_sequences": AT_LEAST_1,
}


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def range_problems(values: Mapping[str, Any], ranges: Mapping[str, Range]) -> list[str]:
    """``--flag value: must be ...`` for every value in ``values`` outside its range."""
    return [
        f"--{name} {_shown(values[name])}: must be {rule.expect}"
        for name, rule in ranges.items()
        if name in values and values[name] is not None and not rule.ok(values[name])
    ]


# -- checks across flags (train) ------------------------------------------------------------------------------


def _steps_problems(values: Mapping[str, Any]) -> list[str]:
    if values.get("max_steps") == -1 and _number(values.get("num_train_epochs")) and values["num_train_epochs"] <= 0:
        return [
            f"--num_train_epochs {values['num_train_epochs']}: must be > 0 when --max_steps is -1 (the default), "
            "or the run trains nothing; give --num_train_epochs N or --max_steps N"
        ]
    return []


def _precision_problems(values: Mapping[str, Any]) -> list[str]:
    """bf16/fp16 on hardware that has them, by transformers' own tests (as ``TrainingArguments`` checks bf16)."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    problems = []
    on_cpu = bool(values.get("use_cpu"))
    if (values.get("bf16") or values.get("bf16_full_eval")) and not on_cpu:
        if not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
            problems.append(
                "--bf16 true: this machine has no GPU that supports bf16; leave --bf16 out (float32), or add "
                "--use_cpu true to train in bf16 on the CPU"
            )
    if (values.get("fp16") or values.get("fp16_full_eval")) and (on_cpu or not torch.accelerator.is_available()):
        problems.append("--fp16 true: fp16 mixed precision needs a GPU and this run has none; leave --fp16 out")
    return problems


def _resume_problems(values: Mapping[str, Any]) -> list[str]:
    """A checkpoint folder that is not there (``true``, the latest checkpoint of --output_dir, is resolved later)."""
    resume = values.get("resume_from_checkpoint")
    if resume is None or str(resume).lower() in ("true", "false") or Path(resume).is_dir():
        return []
    return [
        f"--resume_from_checkpoint {resume}: no such folder; give a checkpoint folder (OUTPUT_DIR/checkpoint-N) "
        "or true for the latest one in --output_dir"
    ]


# TRL flags our collators cannot honour, and why: refused by name rather than ending in a TRL traceback.
UNSUPPORTED_FLAGS: dict[str, str] = {
    "packing": (
        "Resonance's collators build padded batches of image rows; packing would need rows flattened into one "
        "sequence with per-row position ids (3-D rope positions for the Qwen-VL families) and flash-attention's "
        "varlen kernels; leave --packing out (--train_sampling_strategy group_by_length cuts padding instead)"
    ),
    "padding_free": (
        "Resonance's collators build padded batches of image rows; padding-free batches would need rows flattened "
        "with per-row position ids (3-D rope positions for the Qwen-VL families) and flash-attention's varlen "
        "kernels; leave --padding_free out (--train_sampling_strategy group_by_length cuts padding instead)"
    ),
}


def _unsupported_problems(values: Mapping[str, Any]) -> list[str]:
    return [f"--{name} true: not supported: {why}" for name, why in UNSUPPORTED_FLAGS.items() if values.get(name)]


def _report_to_problems(values: Mapping[str, Any]) -> list[str]:
    """Trackers that are not installed (transformers' Trainer would stop on them with a traceback; accelerate
    would drop them with a warning)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    report_to = values.get("report_to") or []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n.strip() for name in names for n in str(name).split(",") if n.strip() not in ("", "none", "all")]
    installed = f"installed trackers: {', '.join(get_available_reporting_integrations()) or 'none'}"
    fix = "install it, or leave --report_to out (none)"
    problems = []
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            hint = (
                did_you_mean(name, INTEGRATION_TO_CALLBACK, prefix="")
                or f" (known: {', '.join(INTEGRATION_TO_CALLBACK)})"
            )
            problems.append(f"--report_to {name}: not a tracker{hint}")
        elif name not in get_available_reporting_integrations():
            problems.append(f"--report_to {name}: the {name} package is not installed ({installed}); {fix}")
    return problems


def _hub_problems(values: Mapping[str, Any]) -> list[str]:
    """--push_to_hub where huggingface_hub is offline: refused before training, not after it."""
    from huggingface_hub import constants

    if values.get("push_to_hub") and constants.HF_HUB_OFFLINE:
        return [
            "--push_to_hub true: the Hugging Face Hub is offline here (HF_HUB_OFFLINE=1); leave --push_to_hub out "
            "and upload --output_dir later (hf upload REPO OUTPUT_DIR), or unset HF_HUB_OFFLINE"
        ]
    return []


def _trackio_project_problems(values: Mapping[str, Any]) -> list[str]:
    """--project is TrainingArguments' Trackio project name: without the Trackio tracker nothing reads it, and a user
    of the other commands' --project DIR means the Resonance project (--spec_project here)."""
    from transformers import TrainingArguments

    project = values.get("project")
    if project in (None, TrainingArguments.project) or "trackio" in str(values.get("report_to") or ""):
        return []
    return [
        f"--project {project}: the Trackio project name (transformers' TrainingArguments), read only with "
        "--report_to trackio; the Resonance project (the folder holding specs/ and generated/) is --spec_project DIR "
        "in resonance train"
    ]


TRAIN_CHECKS: tuple[Callable[[Mapping[str, Any]], list[str]], ...] = (
    _steps_problems,
    _precision_problems,
    _resume_problems,
    _unsupported_problems,
    _report_to_problems,
    _trackio_project_problems,
    _hub_problems,
    quantization_problems,
)


# -- reading argv ---------------------------------------------------------------------------------------------


def flag_name(flag: str) -> str:
    """``--report-to=x`` -> ``report_to``: the spellings argparse accepts for one dataclass field."""
    return flag.split("=", 1)[0].lstrip("-").replace("-", "_")


def is_value(token: str) -> bool:
    """A token that is a value, not a flag: anything not starting with ``-``, and negative numbers (as argparse)."""
    if not token.startswith("-"):
        return True
    try:
        float(token)
    except ValueError:
        return False
    return True


def did_you_mean(name: str, known: Iterable[str], prefix: str = "--") -> str:
    """``"; did you mean --learning_rate?"`` (``prefix`` before the name), or an empty string when no known flag is
    close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def unknown_problems(
    tokens: Sequence[str], known: Iterable[str], where: str, elsewhere: Callable[[str], str] | None = None
) -> list[str]:
    """One line per unknown flag in ``tokens`` (what the parser did not take), with did-you-mean over ``known``
    or, where none is close, ``elsewhere(name)`` (say, the other commands that take it).

    A value right after an unknown flag is taken as its value; any other stray value is reported on its own.
    """
    known = sorted(set(known))
    problems = []
    after_flag = False
    for token in tokens:
        if is_value(token):
            if not after_flag:
                problems.append(f"unexpected argument {token!r}; flags are written --name value")
            after_flag = False
            continue
        name = flag_name(token)
        hint = did_you_mean(name, known) or (elsewhere and elsewhere(name)) or f" (see {where} --help)"
        problems.append(f"unknown option --{name}: not a flag of {where}{hint}")
        after_flag = "=" not in token
    return problems


def raise_problems(problems: list[str], what: str) -> None:
    """One :class:`ConfigError` listing ``problems`` (the first :data:`MAX_LISTED_ERRORS`), when there are any."""
    if not problems:
        return
    if len(problems) == 1:
        raise ConfigError(problems[0])
    lines = problems[:MAX_LISTED_ERRORS]
    if len(problems) > MAX_LISTED_ERRORS:
        lines.append(f"... and {len(problems) - MAX_LISTED_ERRORS} more")
    raise ConfigError(f"{len(problems)} problems with the flags of {what}:\n  " + "\n  ".join(lines))


def _drop(argv: list[str], option_strings: set[str]) -> list[str]:
    """``argv`` without the flags spelled by ``option_strings`` and the values that follow them."""
    kept: list[str] = []
    dropping = False
    for token in argv:
        if dropping and is_value(token):
            continue
        dropping = False
        if not is_value(token) and token.split("=", 1)[0] in option_strings:
            dropping = "=" not in token
            continue
        kept.append(token)
    return kept


_REQUIRED = object()  # the default of a required flag: read_flags reports it when it is still there


def read_flags(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    ranges: Mapping[str, Range] | None = None,
    elsewhere: Callable[[str], str] | None = None,
) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv`` with ``parser`` (``exit_on_error=False``) and return the namespace and every problem: values
    argparse cannot convert (it stops at the first, so each bad flag is set aside and the rest parsed again; the
    message adds the flag's range from ``ranges``), required flags left out, and unknown flags with did-you-mean
    (and ``elsewhere(name)``, a note on where the flag does belong)."""
    problems: list[str] = []
    argv = list(argv)
    while True:
        try:
            namespace, unknown = parser.parse_known_args(argv)
            break
        except argparse.ArgumentError as exc:
            spellings = set((exc.argument_name or "").split("/"))
            rest = _drop(argv, spellings)
            flag = min(spellings, key=lambda s: ("-" in s[2:], len(s)))
            rule = (ranges or {}).get(flag_name(flag))
            problems.append(f"{flag}: {exc.message}" + (f"; must be {rule.expect}" if rule else ""))
            if rest == argv:  # nothing set aside: report what we have rather than loop
                raise_problems(problems, parser.prog)
            argv = rest
    for action in parser._actions:
        if getattr(namespace, action.dest, None) is _REQUIRED:
            problems.append(f"--{action.dest} is required: {action.help}")
    known = {flag_name(s) for action in parser._actions for s in action.option_strings} - {"help", "h"}
    problems += unknown_problems(unknown, known, parser.prog, elsewhere)
    return namespace, problems


def train_parser(algorithm: str, dataclass_types: Sequence[type], defaults: Mapping[str, Any]) -> Any:
    """transformers' ``HfArgumentParser`` over ``dataclass_types`` that raises instead of exiting, takes no flag
    abbreviations (``--learn`` is an unknown flag, not ``--learning_rate``), reads no ``.args`` file, and reports
    missing required flags with the rest (see :func:`read_flags`). ``defaults`` replace the dataclasses' defaults
    (argparse ``set_defaults``: any spelling the user gives wins)."""
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    parser = HfArgumentParser(
        dataclass_types, prog=f"resonance train {algorithm}", allow_abbrev=False, exit_on_error=False
    )
    for action in parser._actions:
        if action.type is string_to_bool and action.nargs is None:
            # Optional[bool] flags (--bf16, --fp16): a bare --bf16 means true, as every other boolean flag does
            action.nargs, action.const = "?", True
        if action.required:  # reported by read_flags with every other problem, not by argparse on its own
            action.required = False
            action.default = _REQUIRED
    parser.set_defaults(**defaults)
    return parser


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The fields ``argv`` sets, whatever the spelling (``--x_y v``, ``--x-y v``, ``--x_y=v``, ``--no_x``)."""
    options = {s: action.dest for action in parser._actions for s in action.option_strings}
    return {options[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in options}


def other_algorithms(algorithm: str) -> Callable[[str], str]:
    """``hint(name)``: which other ``resonance train`` algorithms take the flag ``name`` (their configs are
    imported only when a flag is unknown)."""
    from dataclasses import fields

    from resonance.algorithms import ALGORITHMS

    def hint(name: str) -> str:
        owners = [
            other.name
            for other in ALGORITHMS.values()
            if other.name != algorithm and name in {f.name for f in fields(other.config_class())}
        ]
        return f"; it is a flag of resonance train {' and '.join(owners)}" if owners else ""

    return hint


def train_ranges(algorithm: str) -> dict[str, Range]:
    """The valid values of ``resonance train ALGORITHM``'s flags."""
    return {**TRAIN_RANGES, **ALGORITHM_RANGES.get(algorithm, {})}


def train_problems(algorithm: str, values: Mapping[str, Any]) -> list[str]:
    """Every value of a ``resonance train ALGORITHM`` run outside its range, and every impossible combination."""
    problems = range_problems(values, train_ranges(algorithm))
    for check in TRAIN_CHECKS:
        problems += check(values)
    if algorithm != "ppo":  # PPO gathers its output itself
        problems += _sharded_output_problems()
    return problems


def _sharded_output_problems() -> list[str]:
    """An FSDP launch whose state dicts are sharded (``fsdp_state_dict_type: SHARDED_STATE_DICT``): transformers'
    Trainer (5.24) then saves no model into --output_dir at all, only sharded checkpoints; refused before training."""
    from accelerate.utils import parse_flag_from_env
    from torch.distributed.fsdp import StateDictType

    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return []
    # accelerate's default where the config names none: sharded for FSDP 2
    default = "FULL_STATE_DICT" if os.environ.get("FSDP_VERSION", "1") == "1" else "SHARDED_STATE_DICT"
    name = os.environ.get("FSDP_STATE_DICT_TYPE", default).upper()
    if name.isdigit():
        name = StateDictType(int(name)).name
    if name != "SHARDED_STATE_DICT":
        return []
    return [
        "fsdp_state_dict_type SHARDED_STATE_DICT (the accelerate config's, or FSDP 2's default where it names none): "
        "transformers' Trainer writes no weights into --output_dir under it, only sharded checkpoints; set "
        "fsdp_state_dict_type: FULL_STATE_DICT, as configs/accelerate/fsdp.yaml does"
    ]


# -- resonance generate ---------------------------------------------------------------------------------------


# The words a boolean flag takes, as transformers' HfArgumentParser (string_to_bool) reads them for resonance train.
BOOLEAN_WORDS = {"true": True, "yes": True, "t": True, "y": True, "1": True} | {
    "false": False, "no": False, "f": False, "n": False, "0": False
}  # fmt: skip


def _parse_value(text: str) -> Any:
    """``true``/``false`` (any case), JSON numbers, lists and null; anything else is a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def generation_fields() -> list[str]:
    """The settings ``resonance generate`` takes: ``transformers.GenerationConfig``'s public fields."""
    from transformers import GenerationConfig

    return sorted(k for k in GenerationConfig().to_dict() if not k.startswith("_"))


def parse_generation_overrides(args: Sequence[str], command_flags: Iterable[str] = ()) -> dict[str, Any]:
    """``["--max_new_tokens", "64", "--do-sample=true", ...]`` -> ``{"max_new_tokens": 64, "do_sample": True}``.

    Every key must be a ``transformers.GenerationConfig`` field; every unknown key, missing value and value out
    of range is reported in one :class:`ConfigError`, with did-you-mean over those fields and ``command_flags``
    (the command's own options: ``--overwrit`` is a misspelt ``--overwrite``, not a generation setting).
    """
    from transformers import GenerationConfig

    fields = generation_fields()
    # GenerationConfig leaves its fields None until generate() applies its defaults: the booleans are read there
    defaults = {**GenerationConfig().to_dict(), **GenerationConfig._get_default_generation_params()}
    switches = {name for name, value in defaults.items() if isinstance(value, bool)}
    overrides: dict[str, Any] = {}
    unknown: list[str] = []
    problems: list[str] = []
    tokens = list(args)
    while tokens:
        token = tokens.pop(0)
        if is_value(token) or token == "--":
            unknown.append(token)
            continue
        name, has_value, value = token.partition("=")
        name = flag_name(name)
        if not has_value and tokens and is_value(tokens[0]):
            value, has_value = tokens.pop(0), "="
        if name not in fields and name.startswith("no_") and name[3:] in switches and not has_value:
            overrides[name[3:]] = False  # --no_do_sample, as resonance train's --no_x
        elif name not in fields:
            unknown.append(f"--{name}")
        elif name in switches and not has_value:  # resonance train's rule: a bare --x is true
            overrides[name] = True
        elif name in switches and value.lower() in BOOLEAN_WORDS:  # --x true|false|yes|no|1|0 (any case)
            overrides[name] = BOOLEAN_WORDS[value.lower()]
        elif not has_value:
            problems.append(f"--{name} needs a value")
        else:
            overrides[name] = _parse_value(value)
    where = "resonance generate (transformers.GenerationConfig fields)"
    problems += generation_problems(overrides, complete=False)  # the family's defaults are checked with them later
    problems = unknown_problems(unknown, [*fields, *command_flags], where) + problems
    raise_problems(problems, "resonance generate")
    return overrides


def generation_problems(settings: Mapping[str, Any], complete: bool = True) -> list[str]:
    """Generation settings out of range, sampling at a temperature <= 0, and where ``settings`` are all the call's
    (``complete``: the family's defaults with the flags, not the flags alone) several answers from greedy decoding
    and what ``GenerationConfig.validate`` refuses."""
    from transformers import GenerationConfig

    problems = range_problems(settings, GENERATION_RANGES)
    temperature = settings.get("temperature")
    if temperature is not None and not (_number(temperature) and temperature > 0) and settings.get("do_sample"):
        problems.append(
            f"--temperature {temperature}: sampling needs a finite temperature > 0; for the most likely answer use "
            "greedy decoding (--do_sample false)"
        )
    if not complete:
        return problems
    copies = settings.get("num_return_sequences")
    if _number(copies) and copies > 1 and not settings.get("do_sample") and (settings.get("num_beams") or 1) < 2:
        problems.append(
            f"--num_return_sequences {copies}: greedy decoding has one answer per prompt; add --do_sample true to "
            f"sample {copies} of them (or --num_beams {copies} for the {copies} best beams)"
        )
    if problems:
        return problems
    if settings.get("cache_implementation") == "auto":  # ours (resonance.generation.decode_settings), not transformers'
        settings = {key: value for key, value in settings.items() if key != "cache_implementation"}
    try:
        GenerationConfig(**settings).validate()
    except (ValueError, TypeError) as exc:
        problems.append(f"generation settings: {exc}")
    return problems
