"""The compile path runs no project code and writes nothing outside the project's own generated/ folder.

Payloads are package ``__init__`` files that write a marker file when imported: the compile-time commands read
override modules as source, so the marker never appears.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from resonance import cli, codegen
from resonance.errors import EXIT_FAILED, EXIT_INPUT, EXIT_OK

LLAVA = "generated/llava/__init__.py"

HOOKS = "class ProcessorHooks:\n    def format_multimodal_prompt(self, prompt, num_images):\n        return prompt\n"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _with_overrides(project: Path, module: str) -> Path:
    """llava's spec names ``module`` as its override module (hook: processor.format_multimodal_prompt)."""
    spec = project / "specs" / "llava.yaml"
    block = f"overrides:\n  module: {module}\n  hooks:\n    - processor.format_multimodal_prompt\n"
    spec.write_text(spec.read_text().replace("\n# A tiny", "\n" + block + "\n# A tiny", 1))
    return spec


@pytest.fixture(autouse=True)
def _forget_payload() -> Iterator[None]:
    """Were the payload ever imported, the next test would find it in sys.modules and not import it again."""
    yield
    for name in [n for n in sys.modules if n == "evil" or n.startswith("evil.")]:
        del sys.modules[name]


def _payload_package(project: Path, marker: Path) -> Path:
    """A package ``evil`` whose ``__init__`` writes ``marker`` when it is imported."""
    package = project / "evil"
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return package


@pytest.mark.parametrize("command", ["check", "scaffold"])
def test_missing_submodule_of_a_package_is_an_error_and_its_init_never_runs(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, command: str
) -> None:
    marker = tmp_path / "marker"
    _payload_package(project, marker)
    monkeypatch.syspath_prepend(str(project))  # importable, as from a CI checkout's working folder
    _with_overrides(project, "evil.no_such_module")
    code, err = _run(capsys, command, "--project", str(project))
    assert code == EXIT_INPUT
    assert "overrides.module: cannot find module 'evil.no_such_module'" in err
    assert not marker.exists()


def test_existing_override_module_is_read_not_imported(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    marker = tmp_path / "marker"
    package = _payload_package(project, marker)
    (package / "hooks.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + HOOKS)
    monkeypatch.syspath_prepend(str(project))
    _with_overrides(project, "evil.hooks")
    assert _run(capsys, "scaffold", "--project", str(project))[0] == EXIT_OK
    assert _run(capsys, "check", "--project", str(project))[0] == EXIT_OK
    assert _run(capsys, "models", "--project", str(project))[0] == EXIT_OK
    assert "import evil.hooks as hooks" in (project / LLAVA).read_text()
    assert not marker.exists()


def test_override_module_with_a_syntax_error_is_a_spec_error_at_its_line(project: Path, capsys) -> None:
    (project / "mine").mkdir()
    (project / "mine" / "hooks.py").write_text(HOOKS + "def broken(:\n    pass\n")
    spec = _with_overrides(project, "mine.hooks")
    line = spec.read_text().splitlines().index("  module: mine.hooks") + 1
    code, err = _run(capsys, "check", "--project", str(project))
    assert code == EXIT_INPUT
    assert f"specs/llava.yaml:{line}:11: overrides.module: mine/hooks.py:4: invalid syntax" in err
    assert "Traceback" not in err


def test_generated_folder_linked_outside_the_project_is_refused(project: Path, tmp_path: Path, capsys) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (project / "generated").rename(tmp_path / "was_generated")
    (project / "generated").symlink_to(outside, target_is_directory=True)
    code, err = _run(capsys, "scaffold", "--project", str(project))
    assert code == EXIT_INPUT
    assert "generated: resolves to" in err and "replace the link with a folder" in err
    assert list(outside.iterdir()) == []


def test_adapter_folder_linked_outside_is_refused_and_nothing_is_written(project: Path, tmp_path: Path, capsys) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (project / "generated" / "llava" / "__init__.py").unlink()
    (project / "generated" / "llava").rmdir()
    (project / "generated" / "llava").symlink_to(outside, target_is_directory=True)
    (project / "generated" / "registry.py").unlink()  # would be written first, if targets were not all checked
    code, err = _run(capsys, "scaffold", "--project", str(project))
    assert code == EXIT_INPUT and "refusing to write generated/llava/__init__.py" in err
    assert list(outside.iterdir()) == []
    assert not (project / "generated" / "registry.py").exists()


def test_filesystem_root_as_project_is_refused(capsys) -> None:
    for command in ("scaffold", "check"):
        code, err = _run(capsys, command, "--project", "/")
        assert code == EXIT_INPUT
        assert "--project /: resolves to the filesystem root" in err


def test_generated_files_get_normal_permissions(project: Path) -> None:
    (project / LLAVA).unlink()
    previous = os.umask(0o022)
    try:
        codegen.apply(codegen.plan(project))
    finally:
        os.umask(previous)
    assert (project / LLAVA).stat().st_mode & 0o777 == 0o644


def test_a_deleted_banner_is_a_hand_edit(project: Path, capsys) -> None:
    target = project / LLAVA
    edited = "".join(target.read_text().splitlines(keepends=True)[3:]).replace("True", "False")
    target.write_text(edited)
    code, err = _run(capsys, "check", "--project", str(project))
    assert code == EXIT_FAILED and f"{LLAVA}: edited by hand" in err
    code, err = _run(capsys, "scaffold", "--project", str(project))
    assert code == EXIT_FAILED and "edited by hand" in err
    assert target.read_text() == edited
    assert _run(capsys, "scaffold", "--force", "--project", str(project))[0] == EXIT_OK
    assert _run(capsys, "check", "--project", str(project))[0] == EXIT_OK
