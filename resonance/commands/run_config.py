"""A run config file for ``resonance train X``: ``resonance train dpo run.yaml`` or ``--config run.yaml``.

The file is YAML or JSON: a mapping of flag names (``learning_rate``, ``learning-rate``) to values, as TRL's
``TrlParser --config`` and LLaMA-Factory take. Like TRL, the file's values become the parser's defaults
(``argparse.set_defaults``), so a flag on the command line overrides the file; unlike TRL, every value is first
converted by the flag's own argparse type, so a value of the wrong type is named with the type expected. Every
unknown key (with did-you-mean), key given twice and wrong value is reported at once, as ``FILE:LINE: key: ...``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from resonance.commands.flags import did_you_mean, flag_name, is_value

CONFIG_FLAG = "--config"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
CONFIG_HELP = (
    "A run config: `resonance train ALGORITHM run.yaml` or `--config run.yaml`, a YAML or JSON mapping of these flags' "
    "names to values (learning_rate: 1.0e-5); flags on the command line override it."
)


@dataclass
class RunConfig:
    """What a run config file sets: the flags' values (by argparse dest) and the line each was set on."""

    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)

    def locate(self, problems: list[str], given: set[str]) -> list[str]:
        """``problems`` about flags (``--name ...``) the file set and the command line did not, led by
        ``FILE:LINE:`` so the user knows which line to change."""
        located = []
        for problem in problems:
            name = flag_name(problem.split(" ", 1)[0].split(":", 1)[0]) if problem.startswith("--") else ""
            if name in self.lines and name not in given:
                problem = f"{self.path}:{self.lines[name]}: {problem}"
            located.append(problem)
        return located


def split_config(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """``(config path or None, argv without it, problems)``: the path from ``--config PATH``, ``--config=PATH`` or
    a first argument ending in .yaml, .yml or .json."""
    rest: list[str] = []
    paths: list[str] = []
    problems: list[str] = []
    tokens = list(argv)
    if tokens and is_value(tokens[0]) and tokens[0].lower().endswith(CONFIG_SUFFIXES):
        paths.append(tokens.pop(0))
    while tokens:
        token = tokens.pop(0)
        name, has_value, value = token.partition("=")
        if name != CONFIG_FLAG:
            rest.append(token)
        elif has_value:
            paths.append(value)
        elif tokens and is_value(tokens[0]):
            paths.append(tokens.pop(0))
        else:
            problems.append(f"{CONFIG_FLAG} needs a value: a YAML or JSON file of flag names and values")
    if len(paths) > 1:
        problems.append(f"{len(paths)} run configs given ({', '.join(paths)}): give one")
    return (paths[0] if paths else None), rest, problems


def _expected(action: argparse.Action) -> str:
    """The values ``action`` takes, in words."""
    if action.choices:
        return "one of " + ", ".join(map(str, action.choices))
    kind = getattr(action.type, "__name__", "")
    words = {"float": "a number", "int": "a whole number", "string_to_bool": "true or false", "str": "a string"}
    shown = words.get(kind, kind or "a string")
    return f"a list of {shown.removeprefix('a ')}s" if action.nargs in ("+", "*") else shown


def _convert(action: argparse.Action, value: Any) -> Any:
    """``value`` as the command line would give it: each item through the flag's argparse type and choices.
    Raises ``ValueError`` saying what is expected."""
    if value is None:
        return None  # YAML null: the flag's "not set" (as TRL's set_defaults takes it)
    if isinstance(value, list | dict) and action.type is str and action.nargs is None:
        return value  # fields HfArgumentParser types as str but the config takes whole (report_to, *_kwargs)
    if isinstance(value, dict) or (isinstance(value, list) and action.nargs not in ("+", "*")):
        raise ValueError(_expected(action))
    items = value if isinstance(value, list) else [value]
    converted = []
    for item in items:
        text = str(item).lower() if isinstance(item, bool) else str(item)
        try:
            item = action.type(text) if action.type else text
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ValueError(_expected(action)) from None
        if action.choices and item not in action.choices:
            raise ValueError(_expected(action))
        converted.append(item)
    return converted if action.nargs in ("+", "*") else converted[0]


def _shown(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def read_run_config(
    path_text: str, parser: argparse.ArgumentParser, elsewhere: Callable[[str], str] | None = None
) -> tuple[RunConfig, list[str]]:
    """Read the run config at ``path_text`` against ``parser``'s flags: the values it sets and every problem (an
    unknown key with did-you-mean or, where none is close, ``elsewhere(name)``: the commands that take it)."""
    path = Path(path_text)
    config = RunConfig(path)
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except OSError as exc:
        return config, [f"{path}: cannot read the run config: {exc.strerror or exc}"]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        return config, [f"{where}: not valid YAML or JSON: {exc.problem or exc}"]
    if not isinstance(root, yaml.MappingNode):
        return config, [f"{path}: a run config is a mapping of flag names to values (learning_rate: 1.0e-5)"]
    actions = {flag_name(s): a for a in parser._actions if a.option_strings and a.nargs != 0 for s in a.option_strings}
    actions.pop("help", None)
    loader = yaml.SafeLoader("")
    problems = []
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        key = str(loader.construct_object(key_node))
        value = loader.construct_object(value_node, deep=True)
        action = actions.get(flag_name(key))
        if action is None:
            name = flag_name(key)
            hint = (
                did_you_mean(name, actions, prefix="")
                or (elsewhere and elsewhere(name))
                or f" (see {parser.prog} --help)"
            )
            problems.append(f"{path}:{line}: {key}: not a setting of {parser.prog}{hint}")
        elif action.dest in config.lines:
            problems.append(f"{path}:{line}: {key}: set again (first on line {config.lines[action.dest]}); keep one")
        else:
            config.lines[action.dest] = line
            try:
                config.values[action.dest] = _convert(action, value)
            except ValueError as exc:
                problems.append(f"{path}:{line}: {key}: {_shown(value)} is not {exc}")
    return config, problems
