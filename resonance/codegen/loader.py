"""Load ``specs/<name>.yaml`` into a :class:`ModelSpec`, keeping YAML source positions.

Every problem becomes a :class:`SpecError` whose lines read ``FILE:LINE:COL: field.path: message``,
all problems of a file at once (torchtune-style), with a did-you-mean for unknown keys.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from resonance.codegen.schema import ModelSpec
from resonance.errors import SpecError, SpecProblem

Loc = tuple[str | int, ...]


class _PositionLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys."""


def _construct_mapping(loader: _PositionLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})", mark
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_PositionLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _positions(node: yaml.Node, loc: Loc, out: dict[Loc, tuple[int, int]]) -> None:
    """Record (line, col), 1-based, for every mapping key and sequence item below ``node``."""
    out.setdefault(loc, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*loc, str(key_node.value))
            out[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[(*child, "<value>")] = (value_node.start_mark.line + 1, value_node.start_mark.column + 1)
            _positions(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*loc, index)
            out[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _positions(item, child, out)


def _field_names(model: type[BaseModel], loc: Loc) -> list[str]:
    """The allowed keys at ``loc`` (for did-you-mean), walking nested pydantic models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            args = getattr(current, "__args__", ())
            current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if current is None:
                return []
            if isinstance(part, int):
                continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = field.annotation
        args = getattr(current, "__args__", ())
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            current = nested[0]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _message(error: dict, loc: Loc) -> str:
    if error["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _field_names(ModelSpec, loc[:-1])
        hint = difflib.get_close_matches(key, allowed, n=1)
        suffix = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"unknown key {key!r}{suffix} (allowed: {', '.join(allowed)})"
    if error["type"] == "missing":
        return "required field is missing"
    msg = error["msg"]
    return msg.removeprefix("Value error, ")


def _locate(loc: Loc, positions: dict[Loc, tuple[int, int]], kind: str) -> tuple[int, int]:
    """Where to point: at the value of a wrong field, the key of an unknown one, the parent of a missing one."""
    missing = kind == "missing"
    if kind != "extra_forbidden" and not missing and (*loc, "<value>") in positions:
        return positions[(*loc, "<value>")]
    probe = loc[:-1] if missing else loc
    while probe not in positions and probe:
        probe = probe[:-1]
    return positions.get(probe, (1, 1))


def load_spec(path: str | Path, *, display: str | None = None) -> ModelSpec:
    """Parse and validate one spec file; raise :class:`SpecError` naming file:line:col on any problem."""
    path = Path(path)
    shown = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([SpecProblem(shown, 1, 1, "", f"cannot read spec: {exc.strerror or exc}")]) from exc
    try:
        node = yaml.compose(text, Loader=_PositionLoader)
        data = yaml.load(text, Loader=_PositionLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise SpecError([SpecProblem(shown, line, col, "", f"invalid YAML: {exc.problem or exc}")]) from exc
    if not isinstance(data, dict):
        raise SpecError([SpecProblem(shown, 1, 1, "", "a spec is a YAML mapping with keys like name:, modules:")])
    positions: dict[Loc, tuple[int, int]] = {}
    if node is not None:
        _positions(node, (), positions)
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            line, col = _locate(loc, positions, error["type"])
            field = ".".join(str(p) for p in loc)
            problems.append(SpecProblem(shown, line, col, field, _message(error, loc)))
        raise SpecError(sorted(problems, key=lambda p: (p.line, p.col))) from exc
    spec._positions = positions
    if spec.name != path.stem:
        line, col = positions.get(("name", "<value>"), (1, 1))
        raise SpecError(
            [SpecProblem(shown, line, col, "name", f"{spec.name!r} must match the file name {path.stem!r}.yaml")]
        )
    return spec
