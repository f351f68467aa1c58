"""The import layers of resonance/ (DESIGN.md, "Target layout"), checked over every import, function-level ones too.

Each unit may import the units of the layers above it and the modules of its own folder, never a unit of its own
layer or below; no import cycle inside a folder; generated adapters import ``resonance.api`` only; the compile
path imports neither torch nor transformers (tests/codegen/test_compiler.py runs it in a subprocess).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "resonance"

# Top to bottom; a unit imports only units of earlier layers (and its own folder's modules).
LAYERS: list[set[str]] = [
    {"errors", "generated.registry"},  # generated.registry: data only, imports nothing (checked below)
    {"codegen", "data"},
    {"patches"},
    {"base"},
    {"generation", "reward_funcs"},
    {"algorithms"},
    {"api", "tiny"},
    {"commands"},
    {"cli", "__init__"},
    {"__main__"},
]
LAYER_OF = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}

# Imports that break the layers on purpose, with the reason each stays. Empty: there are none.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")[1:]  # without "resonance"
    if not parts:
        return "__init__"
    if parts[0] == "generated":
        return "generated.registry" if parts[1:] == ["registry"] else "generated"
    return parts[0]


def internal_imports(path: Path) -> list[tuple[int, str]]:
    """Every resonance module ``path`` imports (module-level and inside functions), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("resonance")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("resonance"):
            # `from resonance import api` imports the module resonance.api
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (REPO / Path(*candidate.split("."))).with_suffix(".py").is_file() or (
                    REPO / Path(*candidate.split(".")) / "__init__.py"
                ).is_file()
                found.append((node.lineno, candidate if is_module else node.module))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_name(path)) for path in MODULES}
    assert units <= set(LAYER_OF), units - set(LAYER_OF)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_follow_the_layers(path: Path) -> None:
    module = module_name(path)
    unit = unit_of(module)
    problems = []
    for line, target in internal_imports(path):
        target_unit = unit_of(target)
        if target_unit == unit or (module, target) in ALLOWED:
            continue
        if target_unit not in LAYER_OF or LAYER_OF[target_unit] >= LAYER_OF[unit]:
            problems.append(f"{path.relative_to(REPO)}:{line}: {unit} may not import {target} ({target_unit})")
    assert not problems, "\n".join(problems)


def test_no_import_cycle_inside_a_folder() -> None:
    graph = {module_name(path): {t for _, t in internal_imports(path)} for path in MODULES}
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for target in graph.get(node, ()):
                if unit_of(target) != unit_of(start):
                    continue
                if target == start:
                    pytest.fail("import cycle: " + " -> ".join([*trail, target]))
                if target not in seen:
                    seen.add(target)
                    stack.append((target, [*trail, target]))


def test_generated_code_imports_resonance_api_only() -> None:
    for path in sorted((REPO / "generated").rglob("*.py")):
        targets = {target for _, target in internal_imports(path)}
        allowed = set() if path.name == "registry.py" or path.parent.name == "generated" else {"resonance.api"}
        assert targets == allowed, (path, targets)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        other = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        assert len(other) == len(allowed), (path, [ast.unparse(n) for n in other])


PROJECT = ["--project", str(REPO)]


@pytest.mark.parametrize(
    "args", [["check", *PROJECT], ["scaffold", "--check", *PROJECT], ["schema"], ["models", *PROJECT], ["train"]]
)
def test_compile_path_imports_neither_torch_nor_transformers(args: list[str]) -> None:
    """The compile-time commands (and the train command's listing) run without torch, transformers, trl or peft."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom resonance.cli import app\n"
        f"r = CliRunner().invoke(app, {args!r})\n"
        "assert r.exit_code == (2 if sys.argv[1:] == ['train'] else 0) and r.output, r.output\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, *args[:1]], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
