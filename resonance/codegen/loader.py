"""Load ``specs/<name>.yaml`` into a :class:`ModelSpec`, keeping YAML source positions.

Every problem becomes a :class:`SpecError` whose lines read ``FILE:LINE:COL: field.path: message``,
all problems of a file at once (torchtune-style), with a did-you-mean for unknown keys.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from resonance.codegen.schema import ModelSpec
from resonance.errors import SpecError, SpecProblem

Loc = tuple[str | int, ...]


MAX_SPEC_BYTES = 1 << 20  # the largest shipped spec is about 12 KiB
MAX_DEPTH = 64  # nested lists and mappings; shipped specs nest 5 deep
MAX_NODES = 10_000  # values in a spec with every alias expanded; shipped specs hold at most about 400
INT_RANGE = (-(2**63), 2**63)  # integers a spec may hold: 64-bit signed, as torch and JSON tools read them

_JSON_DATA = "JSON data (a string, number, boolean, null, list or mapping)"
_NOT_DATA = {  # YAML types beyond JSON data: no spec field takes them, and generated code could not hold them
    "timestamp": "a date to YAML; quote it if it is text",
    "binary": "bytes (!!binary)",
    "set": "a set (!!set); write a list",
    "omap": "an ordered mapping (!!omap); write a mapping",
    "pairs": "a list of pairs (!!pairs); write a mapping",
}


class _LimitError(yaml.composer.ComposerError):
    """Valid YAML over a bound of :class:`_SpecLoader` (depth, expanded size, recursion)."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, bounded for untrusted files and limited to JSON data.

    Composing counts nesting depth and, per node, how many values it holds once every alias (``*name``) is
    expanded, so a "billion laughs" file is refused at the node that crosses :data:`MAX_NODES` before anything is
    built. Constructing records, in ``problems``, duplicate and non-scalar keys, lone surrogates, integers beyond
    64 bits, unknown tags and the YAML types that are not JSON data (dates, ``!!binary``, ``!!set``, ...), each
    with its node, and goes on, so one load reports them all.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values it holds, aliases expanded (nodes outlive the load)
        self.problems: list[tuple[yaml.Node, str]] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise _LimitError(None, None, f"alias *{event.anchor} is inside the value it names", event.start_mark)
            return node
        start = self.peek_event().start_mark
        if self._depth >= MAX_DEPTH:
            raise _LimitError(None, None, f"lists and mappings nest more than {MAX_DEPTH} levels deep here", start)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        size = 1 + sum(self._sizes[id(child)] for child in children)
        if size > MAX_NODES:
            raise _LimitError(
                None,
                None,
                f"this value holds more than {MAX_NODES} values with its aliases (*name) expanded; a spec needs far "
                "fewer: write the values out, or alias fewer of them",
                start,
            )
        self._sizes[id(node)] = size
        return node

    def refuse(self, node: yaml.Node, message: str) -> None:
        """Record a problem at ``node``; the value is built as None and the load goes on."""
        self.problems.append((node, message))


def _construct_mapping(loader: _SpecLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    pairs = []
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, flattened by construct_mapping
            pairs.append((key_node, value_node))
        elif not isinstance(key_node, yaml.ScalarNode):
            kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
            loader.refuse(key_node, f"a {kind} as a mapping key; keys are names or strings")
        elif (key := loader.construct_object(key_node, deep=True)) in seen:
            loader.refuse(key_node, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})")
        else:
            seen[key] = key_node
            pairs.append((key_node, value_node))
    node.value = pairs  # construct_mapping builds what is left; the refused keys are reported
    return loader.construct_mapping(node, deep=deep)


def _construct_str(loader: _SpecLoader, node: yaml.ScalarNode) -> str | None:
    value = loader.construct_scalar(node)
    surrogate = next((char for char in value if "\ud800" <= char <= "\udfff"), None)
    if surrogate is None:
        return value
    loader.refuse(
        node,
        f"lone surrogate \\u{ord(surrogate):04x} is half of a character, not text; write the character itself "
        "(or one \\U00XXXXXX escape)",
    )
    return None


def _construct_int(loader: _SpecLoader, node: yaml.ScalarNode) -> int | None:
    try:
        value = yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)
    except (ValueError, IndexError):  # `!!int x`, or more digits than Python converts (sys.get_int_max_str_digits)
        value = None
    if value is not None and INT_RANGE[0] <= value < INT_RANGE[1]:
        return value
    shown = node.value if len(node.value) <= 24 else f"{node.value[:20]}... ({len(node.value)} characters)"
    if value is None and not re.fullmatch(r"[-+]?[0-9_]+", node.value):
        loader.refuse(node, f"{shown!r} is not an integer")
    else:
        loader.refuse(node, f"integer {shown} is out of range: integers in a spec fit in 64 bits")
    return None


def _checked(kind: str, construct: Callable[[yaml.SafeLoader, yaml.ScalarNode], Any]) -> Any:
    """``construct``, with a value its tag cannot read (``!!float x``, ``!!bool 2``) refused instead of raised."""

    def checked(loader: _SpecLoader, node: yaml.ScalarNode) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, KeyError, IndexError):
            loader.refuse(node, f"{node.value!r} is not {kind}")
            return None

    return checked


def _refuse(kind: str) -> Any:
    def construct(loader: _SpecLoader, node: yaml.Node) -> None:
        shown = repr(node.value) if kind == "timestamp" else "this value"
        loader.refuse(node, f"{shown} is not {_JSON_DATA} but {_NOT_DATA[kind]}")

    return construct


def _construct_undefined(loader: _SpecLoader, node: yaml.Node) -> None:
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    loader.refuse(node, f"tag {tag} is not allowed: a spec holds only {_JSON_DATA}")


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_SpecLoader.add_constructor("tag:yaml.org,2002:str", _construct_str)
_SpecLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_SpecLoader.add_constructor("tag:yaml.org,2002:float", _checked("a number", yaml.SafeLoader.construct_yaml_float))
_SpecLoader.add_constructor("tag:yaml.org,2002:bool", _checked("a boolean", yaml.SafeLoader.construct_yaml_bool))
_SpecLoader.add_constructor(None, _construct_undefined)
for _kind in _NOT_DATA:
    _SpecLoader.add_constructor(f"tag:yaml.org,2002:{_kind}", _refuse(_kind))


def _positions(node: yaml.Node, loc: Loc, out: dict[Loc, tuple[int, int]], paths: dict[int, Loc] | None = None) -> None:
    """Record (line, col), 1-based, for every mapping key and sequence item below ``node``, and in ``paths`` the
    field path of every node (by ``id``; a key node's is its field, an aliased node's its first place)."""
    paths = {} if paths is None else paths
    out.setdefault(loc, (node.start_mark.line + 1, node.start_mark.column + 1))
    paths.setdefault(id(node), loc)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # refused when constructed: no field below it
                paths.setdefault(id(key_node), loc)
                continue
            child = (*loc, str(key_node.value))
            paths.setdefault(id(key_node), child)
            out[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[(*child, "<value>")] = (value_node.start_mark.line + 1, value_node.start_mark.column + 1)
            _positions(value_node, child, out, paths)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*loc, index)
            out[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _positions(item, child, out, paths)


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


def _spec_path(loc: Loc, positions: dict[Loc, tuple[int, int]], missing: bool) -> Loc:
    """``loc`` as a path of keys and indices in the YAML file.

    pydantic puts parts in error locations that are no key of the file: the tag of the member it chose
    in a tagged union (``wordpiece``; ``dict``/``list`` inside free-form values) and ``[key]`` for a bad
    mapping key. Such parts are dropped; a ``missing`` field, the last part, is kept.
    """
    path: Loc = ()
    for index, part in enumerate(loc):
        if part == "[key]":
            continue
        if (*path, part) not in positions and (*path, str(part)) in positions:
            part = str(part)  # a YAML key that is a number: positions hold every key as a string
        if (*path, part) in positions or (missing and index == len(loc) - 1):
            path = (*path, part)
    return path


_MISSING = ("missing", "union_tag_not_found")  # error types about a field that is not in the file


def _message(error: dict, loc: Loc) -> str:
    if error["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _field_names(tuple(error["loc"])[:-1])
        hint = difflib.get_close_matches(key, allowed, n=1)
        suffix = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"unknown key {key!r}{suffix} (allowed: {', '.join(allowed)})"
    if error["type"] in _MISSING:
        return "required field is missing"
    if error["type"] == "union_tag_invalid":
        return f"Input should be {error['ctx']['expected_tags']}, not {error['ctx']['tag']!r}"
    if error["type"] == "invalid-json-value":
        value = error["input"]
        return f"{value!r} is not JSON data (string, number, boolean, null, list or mapping); quote it if it is text"
    if error["type"] == "finite_number":
        return f"{error['input']!r} is not a finite number: no spec field means anything by .inf or .nan"
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
    missing = kind in _MISSING
    if kind not in ("extra_forbidden", "[key]") and not missing and (*loc, "<value>") in positions:
        return positions[(*loc, "<value>")]
    probe = loc[:-1] if missing else loc
    while probe not in positions and probe:
        probe = probe[:-1]
    return positions.get(probe, (1, 1))


def _read(path: Path, shown: str) -> str:
    """The spec's text: a regular file of at most :data:`MAX_SPEC_BYTES` bytes of UTF-8."""

    def refuse(line: int, col: int, message: str) -> SpecError:
        return SpecError([SpecProblem(shown, line, col, "", message)])

    try:
        if path.exists() and not path.is_file():
            raise refuse(1, 1, "not a regular file: a spec is a YAML file")
        with path.open("rb") as handle:
            data = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise refuse(1, 1, f"cannot read spec: {exc.strerror or exc}") from exc
    if len(data) > MAX_SPEC_BYTES:
        raise refuse(
            1, 1, f"larger than {MAX_SPEC_BYTES >> 20} MiB: a spec is a short YAML file (shipped ones are ~10 KiB)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        col = len(data[line_start : exc.start].decode("utf-8", errors="replace")) + 1
        message = f"byte 0x{data[exc.start]:02x} is not UTF-8 text: save the spec as UTF-8"
        raise refuse(line, col, message) from exc


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of character ``index`` of ``text``."""
    return text.count("\n", 0, index) + 1, index - text.rfind("\n", 0, index)


def _yaml_message(exc: yaml.MarkedYAMLError, text: str, open_marks: list[yaml.Mark]) -> tuple[tuple[int, int], str]:
    """Where a YAML error is and what it says. PyYAML gives where the parser gave up (``problem_mark``) and where
    the construct it was reading began (``context_mark``); both are named. The place is where the construct began
    when it is one that must be closed (``[``, ``{``, a quote: an unclosed one runs on, and the parser gives up far
    below, often at the end of the file), or the innermost ``[``/``{`` still open; else where the parser gave up."""
    problem, began, gave_up = exc.problem or str(exc), exc.context_mark, exc.problem_mark
    if gave_up is None:
        return (1, 1), f"invalid YAML: {problem}"
    if isinstance(exc, _LimitError):
        return (gave_up.line + 1, gave_up.column + 1), problem
    if "'\\t'" in problem:
        problem += "; indent with spaces"
    there = f"at line {gave_up.line + 1}, column {gave_up.column + 1}"
    if began is not None and (began.line, began.column) != (gave_up.line, gave_up.column):
        if text[began.index : began.index + 1] in ("[", "{", '"', "'"):
            return (
                began.line + 1,
                began.column + 1,
            ), f"invalid YAML: {exc.context} that starts here, {problem} {there}"
        starts = "that starts " if (exc.context or "").startswith("while ") else ""
        where = f"at line {began.line + 1}, column {began.column + 1}"
        return (gave_up.line + 1, gave_up.column + 1), f"invalid YAML: {problem} ({exc.context} {starts}{where})"
    opener = open_marks[-1] if open_marks else None  # a flow collection holds no block one: the last is innermost
    if opener is not None and text[opener.index : opener.index + 1] in ("[", "{"):
        bracket = text[opener.index]
        return (opener.line + 1, opener.column + 1), f"invalid YAML: {problem} {there}, inside the {bracket!r} here"
    context = f"{exc.context}: " if exc.context else ""
    return (gave_up.line + 1, gave_up.column + 1), f"invalid YAML: {context}{problem}"


def _load_yaml(text: str, shown: str) -> tuple[Any, dict[Loc, tuple[int, int]]]:
    """The spec's data and the position of every field, in one bounded pass; every problem a SpecError."""

    def refuse(problems: list[tuple[tuple[int, int], str, str]]) -> SpecError:
        return SpecError([SpecProblem(shown, line, col, field, message) for (line, col), field, message in problems])

    try:
        loader = _SpecLoader(text)
    except yaml.reader.ReaderError as exc:  # the reader checks every character before anything is parsed
        code = exc.character
        escape = f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
        message = f"character U+{code:04X} is not allowed in YAML; inside a double-quoted string write it as {escape}"
        raise refuse([(_position(text, exc.position), "", message)]) from exc
    try:
        node = loader.get_single_node()
        if not isinstance(node, yaml.MappingNode):
            raise refuse([((1, 1), "", "a spec is a YAML mapping with keys like name:, modules:")])
        positions: dict[Loc, tuple[int, int]] = {}
        paths: dict[int, Loc] = {}
        _positions(node, (), positions, paths)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        where, message = _yaml_message(exc, text, loader.marks)
        raise refuse([(where, "", message)]) from exc
    finally:
        loader.dispose()
    if loader.problems:
        found = [
            ((n.start_mark.line + 1, n.start_mark.column + 1), ".".join(map(str, paths.get(id(n), ()))), message)
            for n, message in loader.problems
        ]
        raise refuse(sorted(found))
    return data, positions


def load_spec(path: str | Path, *, display: str | None = None) -> ModelSpec:
    """Parse and validate one spec file; raise :class:`SpecError` naming file:line:col on any problem."""
    path = Path(path)
    shown = display or str(path)
    data, positions = _load_yaml(_read(path, shown), shown)
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = _spec_path(tuple(error["loc"]), positions, error["type"] in _MISSING)
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


def collisions(loaded: list[tuple[str, ModelSpec]]) -> list[SpecProblem]:
    """Problems between specs (each shown by its file): two with one adapter name, or an architecture claimed
    twice. The registry maps a checkpoint's architecture to one adapter, so a second claim, a copy of
    ``llava.yaml`` under another name, would silently take over every checkpoint of the first."""
    problems: list[SpecProblem] = []
    names: dict[str, str] = {}
    owners: dict[str, tuple[str, ModelSpec, int]] = {}
    for shown, spec in loaded:
        if spec.name in names:
            where = spec.position("name", "<value>")
            problems.append(SpecProblem(shown, *where, "name", f"{spec.name!r} also in {names[spec.name]}"))
        names.setdefault(spec.name, shown)
        for index, architecture in enumerate(spec.architectures):
            if architecture not in owners:
                owners[architecture] = (shown, spec, index)
                continue
            first_file, first_spec, first_index = owners[architecture]
            first = f"{first_file}:{first_spec.position('architectures', first_index)[0]}"
            message = (
                f"{architecture!r} is listed twice (first at {first})"
                if first_spec is spec
                else f"{architecture!r} is also claimed by {first} (adapter {first_spec.name!r}); a checkpoint's "
                "architecture selects one adapter: remove it from one of the two specs"
            )
            where = spec.position("architectures", index)
            problems.append(SpecProblem(shown, *where, f"architectures.{index}", message))
    return problems
