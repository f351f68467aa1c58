"""Load ``specs/<name>.yaml`` into a :class:`ModelSpec`, keeping YAML source positions.

Every problem becomes a :class:`SpecError` whose lines read ``FILE:LINE:COL: field.path: message``,
all problems of a file at once (torchtune-style), with a did-you-mean for unknown keys.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

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


def _options(annotation: Any) -> list[Any]:
    """The types an annotation allows, with ``Annotated`` metadata and unions (``X | None``) unpacked."""
    if get_origin(annotation) is Annotated:
        return _options(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [option for arg in get_args(annotation) for option in _options(arg)]
    return [annotation]


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [o for o in _options(annotation) if isinstance(o, type) and issubclass(o, BaseModel)]


def _tags(model: type[BaseModel]) -> set[Any]:
    """The values of ``model``'s ``Literal`` fields: a member of a tagged union is chosen by one of them."""
    return {
        value
        for f in model.model_fields.values()
        if get_origin(f.annotation) is Literal
        for value in get_args(f.annotation)
    }


def _below(annotation: Any, part: str | int) -> Any:
    """The annotation at ``part`` of a pydantic error location below ``annotation`` (None: not a schema type)."""
    models = _models(annotation)
    for model in models:
        if part in model.model_fields:
            return model.model_fields[part].annotation
    if len(models) > 1:  # pydantic names the member of a tagged union it chose by its tag (tiny.extra_tokenizers)
        return next((model for model in models if part in _tags(model)), None)
    for option in _options(annotation):
        if get_origin(option) is dict:
            return get_args(option)[1]
        if get_origin(option) is list and isinstance(part, int):
            return get_args(option)[0]
    return None


def _field_names(loc: Loc) -> list[str]:
    """The keys allowed at pydantic error location ``loc`` (for did-you-mean), walking the schema from ModelSpec."""
    current: Any = ModelSpec
    for part in loc:
        current = _below(current, part)
        if current is None:
            return []
    models = _models(current)
    return list(models[0].model_fields) if len(models) == 1 else []


def _spec_path(loc: Loc, positions: dict[Loc, tuple[int, int]]) -> Loc:
    """``loc`` as a path of keys and indices in the YAML file.

    pydantic puts parts in error locations that are no key of the file: the tag of the member it chose
    in a tagged union (``wordpiece``; ``dict``/``list`` inside free-form values) and ``[key]`` for a bad
    mapping key. Such parts are dropped; a missing field, the last part, is kept.
    """
    path: Loc = ()
    for index, part in enumerate(loc):
        if part == "[key]":
            continue
        if (*path, part) not in positions and (*path, str(part)) in positions:
            part = str(part)  # a YAML key that is a number: positions hold every key as a string
        if (*path, part) in positions or index == len(loc) - 1:
            path = (*path, part)
    return path


def _message(error: dict, loc: Loc) -> str:
    if error["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _field_names(tuple(error["loc"])[:-1])
        hint = difflib.get_close_matches(key, allowed, n=1)
        suffix = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"unknown key {key!r}{suffix} (allowed: {', '.join(allowed)})"
    if error["type"] in ("missing", "union_tag_not_found"):
        return "required field is missing"
    if error["type"] == "union_tag_invalid":
        return f"Input should be {error['ctx']['expected_tags']}, not {error['ctx']['tag']!r}"
    if error["type"] == "invalid-json-value":
        value = error["input"]
        return f"{value!r} is not JSON data (string, number, boolean, null, list or mapping); quote it if it is text"
    if _is_key(error) and error["type"] == "string_type":
        return f"key {error['loc'][-2]!r} is not a string: quote it"
    msg = error["msg"].removeprefix("Value error, ")
    if _is_key(error) and repr(error["loc"][-2]) not in msg:
        msg = f"key {error['loc'][-2]!r}: {msg}"
    return msg


def _is_key(error: dict) -> bool:
    """Whether the error is about a mapping's key, not its value."""
    return tuple(error["loc"])[-1:] == ("[key]",)


def _locate(loc: Loc, positions: dict[Loc, tuple[int, int]], kind: str) -> tuple[int, int]:
    """Where to point: at the value of a wrong field, the key of an unknown one or a wrong key, the parent of a
    missing one."""
    missing = kind in ("missing", "union_tag_not_found")
    if kind not in ("extra_forbidden", "[key]") and not missing and (*loc, "<value>") in positions:
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
            loc = _spec_path(tuple(error["loc"]), positions)
            tag_field = error.get("ctx", {}).get("discriminator", "")
            if error["type"].startswith("union_tag_") and tag_field.startswith("'"):  # at kind, not the mapping
                loc = (*loc, tag_field.strip("'"))
            line, col = _locate(loc, positions, "[key]" if _is_key(error) else error["type"])
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
