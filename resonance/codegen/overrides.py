"""Checks of a spec's hand-written override module, read as source (never imported at compile time).

The module defines one mixin per adapter class it changes (``class ProcessorHooks:``, see
:data:`resonance.codegen.hooks.SLOTS`), holding the hook methods the spec lists in ``overrides.hooks``. Every
listed hook must exist in the catalogue, be defined in its mixin with the catalogue's parameters (and as a
classmethod where the base's is one); a public method of a mixin that the spec does not list, and a ``*Hooks``
class that is no slot's mixin, are errors too: either would change behaviour that no spec line names.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import sys
from pathlib import Path

from resonance.codegen.hooks import HOOKS, SLOT_BY_MIXIN, SLOT_BY_NAME, Hook
from resonance.codegen.schema import ModelSpec
from resonance.errors import SpecError, SpecProblem


def _override_source(module: str, project: Path) -> Path | None:
    """Find the override module's file without importing it (project folder first, then sys.path)."""
    relative = Path(*module.split("."))
    for base in (project, *map(Path, sys.path)):
        for candidate in (base / relative.with_suffix(".py"), base / relative / "__init__.py"):
            if candidate.is_file():
                return candidate
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found and found.origin and found.origin.endswith(".py") else None


def _params(func: ast.FunctionDef) -> tuple[str, ...]:
    args = func.args
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append("**" + args.kwarg.arg)
    return tuple(names)


def _is_classmethod(func: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "classmethod" for d in func.decorator_list)


def _mixins(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef) and node.name.endswith("Hooks")}


def resolve_hooks(spec: ModelSpec, spec_file: str, project: Path) -> set[str]:
    """The slots whose generated class takes the override module's mixin; a SpecError lists every problem."""
    if spec.overrides is None:
        return set()
    problems: list[SpecProblem] = []

    def problem(where: str, position: tuple[int, int], message: str) -> None:
        problems.append(SpecProblem(spec_file, *position, where, message))

    module_position = spec.position("overrides", "module", "<value>")
    source_path = _override_source(spec.overrides.module, project)
    mixins: dict[str, ast.ClassDef] = {}
    if source_path is None:
        problem("overrides.module", module_position, f"cannot find module {spec.overrides.module!r}")
    else:
        mixins = _mixins(ast.parse(source_path.read_text(encoding="utf-8"), filename=str(source_path)))
    for name, node in mixins.items():
        if name not in SLOT_BY_MIXIN:
            close = difflib.get_close_matches(name, SLOT_BY_MIXIN, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problem(
                "overrides.module", module_position, f"{source_path}:{node.lineno}: no adapter class takes {name}{hint}"
            )
    slots: set[str] = set()
    listed: set[tuple[str, str]] = set()
    for index, name in enumerate(spec.overrides.hooks):
        where, position = f"overrides.hooks.{index}", spec.position("overrides", "hooks", index)
        hook: Hook | None = HOOKS.get(name)
        if hook is None:
            close = difflib.get_close_matches(name, HOOKS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problem(where, position, f"unknown hook {name!r}{hint}")
            continue
        if (hook.slot, hook.method) in listed:
            problem(where, position, f"{name!r} is listed twice")
        listed.add((hook.slot, hook.method))
        slots.add(hook.slot)
        if source_path is None:
            continue
        mixin = SLOT_BY_NAME[hook.slot].mixin
        methods = {n.name: n for n in getattr(mixins.get(mixin), "body", []) if isinstance(n, ast.FunctionDef)}
        func = methods.get(hook.method)
        if func is None:
            problem(where, position, f"{source_path} defines no method {mixin}.{hook.method}")
            continue
        params = _params(func)
        if params != hook.params:
            problem(where, position, f"{source_path}:{func.lineno}: {hook.method}{params} must take {hook.params}")
        elif _is_classmethod(func) != hook.classmethod:
            kind = "a @classmethod" if hook.classmethod else "a plain method, not a @classmethod"
            problem(where, position, f"{source_path}:{func.lineno}: {mixin}.{hook.method} must be {kind}")
    for name, node in mixins.items():
        slot = SLOT_BY_MIXIN.get(name)
        if slot is None:
            continue
        for func in node.body:
            private = func.name.startswith("_") and not func.name.endswith("__")
            if isinstance(func, ast.FunctionDef) and not private:
                if (slot.name, func.name) not in listed:
                    problem(
                        "overrides.hooks",
                        spec.position("overrides", "hooks"),
                        f"{source_path}:{func.lineno}: {name}.{func.name} is not listed; add {slot.name}.{func.name} "
                        "(a hook of resonance.codegen.hooks.HOOKS) or make it private (_name)",
                    )
    if problems:
        raise SpecError(problems)
    return slots
