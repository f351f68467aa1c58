"""Every value the schema accepts compiles to code that imports and holds that value.

A seeded random generator (hypothesis is not a dependency) builds values of the types a spec carries: strings
of any unicode (quotes, backslashes, newlines, control characters, lone surrogates, astral characters), ints
small and far past Python's 4300-digit ``repr`` limit, floats including -0.0, 1e308, 5e-324, infinities and NaN,
None, bools, and lists and dicts of them. Each is written by the emitter (``render.py``), compiled from its UTF-8
bytes as generated files are, run with no builtins but ``float``, and compared: same types, NaN by isnan, -0.0
by its sign. A whole spec full of such values then goes through ``codegen.plan`` and its module is imported.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import keyword
import math
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from resonance import codegen
from resonance.codegen.loader import INT_RANGE, MAX_DEPTH
from resonance.codegen.render import assign, py_literal

SEED = 20240601
CASES = 400

_CHARS = (
    "\"'\\\n\r\t\x00\x01\x0b\x0c\x1b\x1c\x7f\x85\xa0\u2028\u2029\ufeff\ufffe\uffff"
    "\ud800\udbff\udc00\udfff"  # lone surrogates: a string may hold them, a UTF-8 file cannot
    "{}%#()[]`$é中\U0001f600\U0010ffff"
)
_FLOATS = (0.0, -0.0, 1e308, -1e308, 5e-324, -5e-324, 2.2250738585072014e-308, math.inf, -math.inf, math.nan)


def _string(rng: random.Random, *, surrogates: bool = True) -> str:
    pools = [
        lambda: rng.choice(_CHARS),
        lambda: chr(rng.randrange(0x20, 0x7F)),
        lambda: chr(rng.randrange(0x80, 0xD800)),
        lambda: chr(rng.randrange(0xE000, 0x110000)),
    ]
    text = "".join(rng.choice(pools)() for _ in range(rng.randrange(0, 24)))
    return text if surrogates else "".join(c for c in text if not "\ud800" <= c <= "\udfff")


def _int(rng: random.Random, *, wide: bool = True) -> int:
    low, high = INT_RANGE
    kinds = [
        lambda: rng.randrange(-300, 300),
        lambda: rng.choice([low, high - 1, 0, -1, 2**31, -(2**53) - 1]),
        lambda: rng.randrange(low, high),
    ]
    if wide:  # past repr's default limit of 4300 digits, and past 64 bits
        kinds += [lambda: rng.choice([-1, 1]) * 10 ** rng.randrange(19, 6000), lambda: rng.choice([high, low - 1])]
    return rng.choice(kinds)()


def _float(rng: random.Random, *, finite: bool = False) -> float:
    kinds = [
        lambda: rng.choice(_FLOATS),
        lambda: struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0],  # any double, NaN payloads too
        lambda: rng.uniform(-10, 10),
    ]
    while True:
        value = rng.choice(kinds)()
        if not finite or math.isfinite(value):
            return value


def _identifier(rng: random.Random) -> str:
    while True:
        name = rng.choice("abcxyz_") + "".join(rng.choice("abz_019") for _ in range(rng.randrange(0, 8)))
        if not keyword.iskeyword(name) and not (name.startswith("__") and name.endswith("__")):
            return name


def _value(rng: random.Random, depth: int = 0, *, spec: bool = False) -> Any:
    """A random value; ``spec``: only what a spec file may hold (finite floats, 64-bit ints, no surrogates)."""
    leaves = [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: _int(rng, wide=not spec),
        lambda: _float(rng, finite=spec),
        lambda: _string(rng, surrogates=not spec),
    ]
    kind = rng.randrange(7) if depth < 4 else 0
    if kind == 5:
        return [_value(rng, depth + 1, spec=spec) for _ in range(rng.randrange(0, 5))]
    if kind == 6:
        return {_string(rng, surrogates=not spec): _value(rng, depth + 1, spec=spec) for _ in range(rng.randrange(5))}
    return rng.choice(leaves)()


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types; NaN equals NaN and -0.0 differs from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def _only_literals(node: ast.AST) -> None:
    """Nothing in ``node`` runs but ``float("inf" | "-inf" | "nan")``: the rest is literals."""
    for child in ast.walk(node):
        if isinstance(child, ast.Call):
            assert isinstance(child.func, ast.Name) and child.func.id == "float" and not child.keywords
            assert [ast.literal_eval(arg) for arg in child.args] in (["inf"], ["-inf"], ["nan"]), ast.unparse(child)
        elif isinstance(child, ast.Name | ast.Attribute | ast.Lambda | ast.NamedExpr):
            assert isinstance(child, ast.Name) and child.id == "float", ast.unparse(child)


def _run(source: str) -> Any:
    """``source`` (a class C holding x) compiled from its UTF-8 bytes, as the generated file is read."""
    namespace: dict[str, Any] = {
        "__builtins__": {"float": float, "__build_class__": builtins.__build_class__},
        "__name__": "emitted",
    }
    exec(compile(source.encode("utf-8"), "<emitted>", "exec"), namespace)  # noqa: S102 - the property under test
    return namespace["C"].x


def test_random_values_render_to_python_that_evaluates_to_them() -> None:
    rng = random.Random(SEED)
    for case in range(CASES):
        value = _value(rng)
        source = f"class C:\n    {assign('x', value, 4)}\n"
        _only_literals(ast.parse(source).body[0].body[0].value)
        assert same(_run(source), value), (case, value, source)


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (math.inf, 'float("inf")'),
        (-math.inf, 'float("-inf")'),
        (math.nan, 'float("nan")'),
        (-0.0, "-0.0"),
        (5e-324, "5e-324"),
        (10**5000, hex(10**5000)),
        ("\ud800", '"\\ud800"'),
        ({"t": math.inf}, '{"t": float("inf")}'),
    ],
    ids=["inf", "-inf", "nan", "-0.0", "subnormal", "5000-digit-int", "lone-surrogate", "nested-inf"],
)
def test_values_repr_cannot_write(value: Any, written: str) -> None:
    """repr gives a bare ``inf`` (a NameError on import), raises on 5000 digits; JSON leaves a surrogate raw."""
    assert py_literal(value) == written
    assert same(_run(f"class C:\n    x = {written}\n"), value)


def _load(path: Path, name: str) -> Any:
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _nested(depth: int) -> Any:
    return [1, _nested(depth - 1)] if depth else "bottom"


def test_a_spec_full_of_accepted_values_compiles_to_a_module_that_holds_them(project: Path) -> None:
    rng = random.Random(SEED)
    path = project / "specs" / "llava.yaml"
    data = yaml.safe_load(path.read_text())
    generation = {_identifier(rng): _value(rng, spec=True) for _ in range(40)}
    generation |= {"edges": list(_FLOATS[:7]) + [INT_RANGE[0], INT_RANGE[1] - 1], "deep": _nested(MAX_DEPTH - 4)}
    kwargs = {_identifier(rng): _value(rng, spec=True) for _ in range(20)}
    placeholder = "<" + _string(rng, surrogates=False) + "\"'\\\n>"
    inline = "{% for m in messages %}" + _string(rng, surrogates=False) + "\"\"\"'''\\{% endfor %}"
    data["generation"] = generation
    data["image"] |= {"placeholder": placeholder, "processor_kwargs": kwargs}
    data["chat_template"] = {"source": "inline", "template": inline}
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")

    codegen.apply(codegen.plan(project))  # the spec is valid: every value above is one the schema accepts
    tree = ast.parse((project / "generated" / "llava" / "__init__.py").read_bytes())
    emitted = ("default_generation_kwargs", "processor_call_kwargs", "image_placeholder", "inline_chat_template")
    assigned = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and n.targets[0].id in emitted]
    assert len(assigned) == len(emitted)
    for node in assigned:
        _only_literals(node.value)
    module = _load(project / "generated" / "llava" / "__init__.py", "emitted_llava")
    assert same(module.LlavaForRL.default_generation_kwargs, generation)
    assert same(module.LlavaProcessor.processor_call_kwargs, kwargs)
    assert module.LlavaProcessor.image_placeholder == placeholder
    assert module.LlavaProcessor.inline_chat_template == inline
