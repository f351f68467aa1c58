"""The project: which files generated/ should hold (the plan), how they differ (drift), atomic writes."""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from resonance.codegen.adapter import adapter_classes
from resonance.codegen.loader import collisions, load_spec
from resonance.codegen.overrides import resolve_hooks
from resonance.codegen.render import edited_by_hand, environment, is_generated, render, templates_dir
from resonance.codegen.schema import ModelSpec
from resonance.errors import ConfigError, SpecError, SpecProblem

OUTPUT_DIR = "generated"


SPECS_DIR = "specs"
SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass
class Plan:
    """The files the compiler wants under ``generated/`` (relative path -> content) and stale ones."""

    project: Path
    files: dict[str, str] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def relative(path: Path, project: Path) -> str:
    try:
        return path.resolve().relative_to(project.resolve()).as_posix()
    except ValueError:
        return str(path)


def project_specs(project: Path) -> list[Path]:
    return sorted((project / SPECS_DIR).glob("*.yaml"))


def load_specs(paths: list[Path], project: Path) -> list[tuple[Path, ModelSpec]]:
    """Load every spec, collecting all files' problems into one SpecError."""
    loaded, problems = [], []
    for path in paths:
        try:
            loaded.append((path, load_spec(path, display=relative(path, project))))
        except SpecError as exc:
            problems.extend(exc.problems)
    problems.extend(collisions([(relative(path, project), spec) for path, spec in loaded]))
    if problems:
        raise SpecError(problems)
    return loaded


def _command(spec_files: list[str]) -> str:
    return "resonance scaffold " + " ".join(spec_files) if spec_files else "resonance scaffold"


def project_root(project: Path) -> Path:
    """The project folder, resolved; the filesystem root is refused (its generated/ would be ``/generated``)."""
    resolved = project.resolve()
    if resolved == Path(resolved.anchor):
        raise ConfigError(
            f"--project {project}: resolves to the filesystem root {resolved}; name the folder that holds specs/ "
            "and generated/"
        )
    return resolved


def packaged_root() -> Path:
    """The folder whose specs/ ships with resonance: ``resonance/_data`` in a wheel (setup.py copies specs/ and
    templates/ there), the checkout itself in a source or editable install; the templates' parent either way."""
    return templates_dir().parent


def find_project(start: Path) -> Path | None:
    """The project that commands run in from ``start``: ``start`` itself when it holds specs/ (a project before its
    first scaffold too), else the nearest folder above it holding both specs/ and generated/ (as git finds .git);
    None when there is none."""
    start = start.resolve()
    if (start / SPECS_DIR).is_dir():
        return start
    return next((d for d in start.parents if (d / SPECS_DIR).is_dir() and (d / OUTPUT_DIR).is_dir()), None)


def _explicit_project(project: Path) -> Path:
    root = project_root(project)
    if not (root / SPECS_DIR).is_dir():
        what = "no such folder" if not root.exists() else f"has no {SPECS_DIR}/ folder"
        raise ConfigError(f"--project {project}: {what}; name the folder that holds {SPECS_DIR}/ (and {OUTPUT_DIR}/)")
    return root


@dataclass(frozen=True)
class SpecSource:
    """The specs in use: a project's own specs/ (``--project``, or found from the current folder) or, with no
    project, the specs packaged with resonance."""

    root: Path  # the folder holding specs/: a project, or packaged_root()
    packaged: bool

    @property
    def folder(self) -> Path:
        return self.root / SPECS_DIR

    def describe(self) -> str:
        """Where the specs come from, in words."""
        if self.packaged:
            return f"the specs packaged with resonance ({self.folder})"
        return f"the project {self.root} ({SPECS_DIR}/)"

    def spec_path(self, name: str) -> Path:
        """The spec file of adapter ``name``; a ConfigError listing the known names when there is none."""
        path = self.folder / f"{name}.yaml"
        if path.is_file():
            return path
        known = ", ".join(p.stem for p in project_specs(self.root)) or "none"
        hint = (
            ""
            if self.packaged
            else f"; the packaged specs are used outside a project, or with --project {packaged_root()}"
        )
        raise ConfigError(f"no spec {name!r} in {self.describe()} (known: {known}){hint}")


def spec_source(project: Path | None) -> SpecSource:
    """The specs in use: ``--project`` when given (it must hold specs/), else the project found from the current
    folder, else the packaged ones."""
    root = _explicit_project(project) if project is not None else find_project(Path.cwd())
    if root is None:
        return SpecSource(packaged_root().resolve(), packaged=True)
    return SpecSource(root, packaged=root == packaged_root().resolve())


def require_project(project: Path | None) -> Path:
    """The project whose generated/ ``scaffold`` and ``check`` work on: ``--project`` or the one found from the
    current folder; a ConfigError when there is none (the packaged specs were compiled when resonance was built)."""
    if project is not None:
        return _explicit_project(project)
    start = Path.cwd().resolve()
    root = find_project(start)
    if root is None:
        raise ConfigError(
            f"no Resonance project in {start} or the folders above it: a project holds {SPECS_DIR}/*.yaml and the "
            f"{OUTPUT_DIR}/ code compiled from them. Run this in the project's folder, or pass --project DIR; to "
            f"start one, create {SPECS_DIR}/NAME.yaml (e.g. a copy of {packaged_root() / SPECS_DIR / 'llava.yaml'}) "
            "and run `resonance scaffold`"
        )
    return root


def files_project(files: list[Path], project: Path | None) -> Path:
    """The project spec files named on the command line compile in: ``--project``, else the folder above their
    specs/ folder (when they share one), else the project found from the current folder."""
    if project is not None:
        return _explicit_project(project)
    parents = {path.resolve().parent for path in files}
    if len(parents) == 1 and (folder := parents.pop()).name == SPECS_DIR:
        return folder.parent
    return require_project(None)


def named_spec(spec: str, project: Path | None) -> tuple[Path, Path]:
    """A spec named on the command line, as an adapter name (``llava``: from the specs in use) or as a file
    (``specs/llava.yaml``), with the project it compiles in (:func:`files_project`)."""
    path = Path(spec)
    if path.suffix not in SPEC_SUFFIXES and len(path.parts) == 1:
        source = spec_source(project)
        return source.spec_path(spec), source.root
    return path, files_project([path], project)


def plan(project: Path, named: list[Path] | None = None) -> Plan:
    """Render the adapters of ``named`` specs (all of the project's when None) and the registry."""
    project = project_root(project)
    every = project_specs(project)
    for path in named or []:
        if path.resolve().parent != (project / SPECS_DIR).resolve():
            rel = relative(path, project)
            raise SpecError(
                [
                    SpecProblem(
                        rel,
                        1,
                        1,
                        "",
                        f"specs live in {project / SPECS_DIR}/ so that `resonance check` sees them",
                    )
                ]
            )
    targets = [p.resolve() for p in named] if named else every
    loaded = load_specs(sorted(set(every) | set(targets)), project)
    env = environment()
    out = Plan(project)
    for path, spec in loaded:
        if path.resolve() not in targets:
            continue
        rel = relative(path, project)
        classes = adapter_classes(spec, resolve_hooks(spec, rel, project))
        out.files[f"{OUTPUT_DIR}/{spec.name}/__init__.py"] = render(
            env, "adapter.py.j2", rel, _command([rel]), spec=spec, classes=classes
        )
    registry_cmd = "resonance scaffold"
    out.files[f"{OUTPUT_DIR}/registry.py"] = render(
        env,
        "registry.py.j2",
        f"{SPECS_DIR}/*.yaml",
        registry_cmd,
        nickname_map={arch: spec.name for _, spec in loaded for arch in spec.architectures},
        flash_models=sorted(arch for _, spec in loaded if spec.flash_attention for arch in spec.architectures),
        spec_files={spec.name: relative(path, project) for path, spec in loaded},
    )
    out.files[f"{OUTPUT_DIR}/__init__.py"] = render(env, "package_init.py.j2", f"{SPECS_DIR}/*.yaml", registry_cmd)
    wanted = {f"{OUTPUT_DIR}/{spec.name}/__init__.py" for _, spec in loaded} | set(out.files)
    gen_dir = project / OUTPUT_DIR
    if gen_dir.is_dir():
        for file in sorted(gen_dir.rglob("*")):
            if not file.is_file() or "__pycache__" in file.parts:
                continue
            rel = file.relative_to(project).as_posix()
            if rel in wanted:
                continue
            text = file.read_text(encoding="utf-8", errors="replace")
            (out.stale if is_generated(text) else out.foreign).append(rel)
    return out


@dataclass
class Drift:
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    hand_edited: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    diff: str = ""

    @property
    def clean(self) -> bool:
        return not (self.missing or self.changed or self.stale or self.foreign)

    def problems(self) -> list[str]:
        """Each file that differs, as ``FILE: what is wrong with it``."""
        labels = (
            ("missing", self.missing),
            ("out of date", [f for f in self.changed if f not in self.hand_edited]),
            ("edited by hand", self.hand_edited),
            ("stale (its spec is gone)", self.stale),
            ("not generated by resonance (move it out of generated/)", self.foreign),
        )
        return [f"{file}: {label}" for label, files in labels for file in files]


def compare(p: Plan) -> Drift:
    """What differs between the plan and the files on disk, with a unified diff."""
    drift = Drift(stale=list(p.stale), foreign=list(p.foreign))
    chunks = []
    for rel, wanted in sorted(p.files.items()):
        path = p.project / rel
        if not path.exists():
            drift.missing.append(rel)
            current = ""
        else:
            current = path.read_text(encoding="utf-8")
            if current == wanted:
                continue
            drift.changed.append(rel)
            if not is_generated(current) or edited_by_hand(current):  # a deleted banner is a hand edit too
                drift.hand_edited.append(rel)
        chunks.extend(
            difflib.unified_diff(
                current.splitlines(keepends=True), wanted.splitlines(keepends=True), f"a/{rel}", f"b/{rel}"
            )
        )
    for rel in p.stale:
        current = (p.project / rel).read_text(encoding="utf-8")
        chunks.extend(difflib.unified_diff(current.splitlines(keepends=True), [], f"a/{rel}", "/dev/null"))
    drift.diff = "".join(chunks)
    return drift


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, content: str) -> None:
    """Write through a temporary file in the same folder and rename it, so no reader sees half a file; the file
    gets the permissions of any file the user creates (0o644 less the umask), not the temporary file's 0o600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _output_path(project: Path, rel: str) -> Path:
    """Where ``rel`` is written: its folder, with every symlink resolved, must be inside the project's own
    generated/ folder. The file itself may be a link: the rename replaces the link, never what it points to."""
    root = project.resolve() / OUTPUT_DIR
    target = project.resolve() / rel
    folder = target.parent.resolve()
    if folder.is_relative_to(root):
        return folder / target.name
    link = project / OUTPUT_DIR
    if link.resolve() != root:
        raise ConfigError(
            f"{link}: resolves to {link.resolve()}, not the project's own {OUTPUT_DIR}/ folder {root}; scaffold "
            "writes only inside the project: replace the link with a folder"
        )
    raise ConfigError(f"refusing to write {rel}: it resolves to {folder / target.name}, outside {root}")


def apply(p: Plan, *, force: bool = False, prune: bool = False) -> list[str]:
    """Write the planned files atomically; returns what changed. Hand-edited files need ``force``; nothing is
    written unless every target stays inside the project's generated/ (a ConfigError says which does not)."""
    drift = compare(p)
    writes = {rel: _output_path(p.project, rel) for rel in sorted(drift.missing + drift.changed)}
    removals = {rel: _output_path(p.project, rel) for rel in (p.stale if prune else [])}  # all checked first
    if drift.hand_edited and not force:
        raise PermissionError(
            "these generated files were edited by hand and would be overwritten: "
            + ", ".join(drift.hand_edited)
            + ". Move the change into an override module (spec `overrides:`), then rerun with --force."
        )
    written = []
    for rel, path in writes.items():
        _atomic_write(path, p.files[rel])
        written.append(rel)
    for rel, path in removals.items():
        path.unlink()
        written.append(f"{rel} (removed)")
    return written
