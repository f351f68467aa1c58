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
from pathlib import Path

from resonance.codegen.hooks import HOOKS, SLOT_BY_MIXIN, SLOT_BY_NAME, Hook
from resonance.codegen.schema import ModelSpec
from resonance.errors import SpecError, SpecProblem


def _module_file(roots: list[Path], parts: list[str]) -> Path | None:
    """``a/b/c.py`` or ``a/b/c/__init__.py`` under the first root that has it, by path alone."""
    for root in roots:
        relative = Path(root, *parts)
        for candidate in (relative.with_suffix(".py"), relative / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _override_source(module: str, project: Path) -> Path | None:
    """The override module's source file, found on disk without running any code: under the project folder first,
    else under the installed top-level package (``find_spec`` of a top-level name locates it and imports nothing;
    of a dotted name it would import the parent packages, so the rest of the path is walked on disk)."""
    parts = module.split(".")
    found = _module_file([project], parts)
    if found is not None:
        return found
    try:
        top = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if top is None:
        return None
    if len(parts) == 1:
        return Path(top.origin) if top.origin and top.origin.endswith(".py") else None
    return _module_file(list(top.submodule_search_locations or []), parts[1:])


def _display(path: Path, project: Path) -> str:
    try:
        return path.resolve().relative_to(project.resolve()).as_posix()
    except ValueError:
        return str(path)


def _parse_module(path: Path, project: Path) -> tuple[ast.Module | None, str | None]:
    """The module's syntax tree, or why it cannot be read (``FILE:LINE: message``)."""
    shown = _display(path, project)
    try:
        return ast.parse(path.read_bytes(), filename=shown), None
    except SyntaxError as exc:  # IndentationError and bad encodings too
        return None, f"{shown}:{exc.lineno or 1}: {exc.msg}; fix the override module"
    except (OSError, ValueError, RecursionError, MemoryError) as exc:
        return None, f"{shown}: cannot read the override module: {exc}"


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
    shown = "" if source_path is None else _display(source_path, project)
    mixins: dict[str, ast.ClassDef] = {}
    if source_path is None:
        where = Path(*spec.overrides.module.split(".")).as_posix()
        problem(
            "overrides.module",
            module_position,
            f"cannot find module {spec.overrides.module!r}: no {where}.py or {where}/__init__.py in the project "
            "folder or an installed package",
        )
    else:
        tree, why = _parse_module(source_path, project)
        if tree is None:
            problem("overrides.module", module_position, why or "")
            source_path = None
        else:
            mixins = _mixins(tree)
    for name, node in mixins.items():
        if name not in SLOT_BY_MIXIN:
            close = difflib.get_close_matches(name, SLOT_BY_MIXIN, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problem("overrides.module", module_position, f"{shown}:{node.lineno}: no adapter class takes {name}{hint}")
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
            problem(where, position, f"{shown} defines no method {mixin}.{hook.method}")
            continue
        params = _params(func)
        if params != hook.params:
            problem(where, position, f"{shown}:{func.lineno}: {hook.method}{params} must take {hook.params}")
        elif _is_classmethod(func) != hook.classmethod:
            kind = "a @classmethod" if hook.classmethod else "a plain method, not a @classmethod"
            problem(where, position, f"{shown}:{func.lineno}: {mixin}.{hook.method} must be {kind}")
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
                        f"{shown}:{func.lineno}: {name}.{func.name} is not listed; add {slot.name}.{func.name} "
                        "(a hook of resonance.codegen.hooks.HOOKS) or make it private (_name)",
                    )
    if problems:
        raise SpecError(problems)
    return slots
