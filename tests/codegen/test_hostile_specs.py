"""Hostile and broken spec files: every one is a SpecError at FILE:LINE:COL (exit 2), bounded, never a traceback.

Through ``load_spec`` for the exact place and message, and through the CLI (``resonance.cli.main``, which turns
an uncaught exception into exit 3 with a traceback) for the exit code and the one line the user sees.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from resonance import codegen
from resonance.cli import main
from resonance.codegen.loader import MAX_DEPTH, MAX_NODES, load_spec
from resonance.errors import EXIT_INPUT, SpecError

GENERATION = "generation: {max_new_tokens: 1024, do_sample: false}"


def _spec(project: Path, old: str, new: str, name: str = "llava") -> Path:
    """llava's spec with ``old`` replaced by ``new``, saved as ``specs/<name>.yaml``."""
    text = (project / "specs" / "llava.yaml").read_text()
    assert old in text, old
    path = project / "specs" / f"{name}.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if needle in line)


def _problems(path: Path) -> list[tuple[int, int, str, str]]:
    with pytest.raises(SpecError) as info:
        load_spec(path, display=f"specs/{path.name}")
    return [(p.line, p.col, p.field, p.message) for p in info.value.problems]


def _check(project: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``resonance check`` on ``project``: the exit code and what it printed to stderr."""
    capsys.readouterr()
    code = main(["check", "--project", str(project)])
    return code, capsys.readouterr().err


# -- bounds: size, alias expansion, depth ------------------------------------------------------------------------

# "Billion laughs": 9 lines, 9 ** 9 strings once the aliases are expanded (74 s and 6.6 GB before the bound).
ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)


def test_alias_bomb_is_refused_where_it_crosses_the_bound(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = project / "specs" / "llava.yaml"
    path.write_text(ALIAS_BOMB + "\n")
    assert len(path.read_bytes()) < 500
    tracemalloc.start()
    try:
        problems = _problems(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 9 ** 5 values with the aliases of line 5 expanded: the first node over the bound, refused before it is built
    assert problems == [(5, 4, "", problems[0][3])]
    assert f"more than {MAX_NODES} values with its aliases" in problems[0][3]
    assert peak < 20 * 2**20, peak  # the expanded lists (9 ** 9 references) were never built
    code, err = _check(project, capsys)
    assert code == EXIT_INPUT and "specs/llava.yaml:5:4: <spec>: this value holds more than" in err
    assert "Traceback" not in err


def test_aliases_within_the_bound_still_load(project: Path) -> None:
    path = _spec(project, 'placeholder: "<image>"', 'placeholder: &tok "<image>"')
    path.write_text(path.read_text().replace('  token: "<image>"', "  token: *tok", 1))
    assert load_spec(path).image.token == "<image>"


def test_recursive_alias_is_refused(project: Path) -> None:
    path = project / "specs" / "llava.yaml"
    path.write_text("name: llava\ngeneration: &g {again: *g}\n")
    assert _problems(path) == [(2, 24, "", "alias *g is inside the value it names")]


@pytest.mark.parametrize(
    ("text", "line", "col"),
    [
        ("name: llava\ngeneration: {x: " + "[" * 400 + "]" * 400 + "}\n", 2, 17 + MAX_DEPTH - 2),
        ("".join("  " * i + f"k{i}:\n" for i in range(400)) + "  " * 400 + "v: 1\n", MAX_DEPTH, 2 * MAX_DEPTH - 1),
    ],
    ids=["flow", "block"],
)
def test_nesting_is_bounded(project: Path, text: str, line: int, col: int) -> None:
    path = project / "specs" / "llava.yaml"
    path.write_text(text)  # 400 deep: a RecursionError (exit 3) before the bound
    assert _problems(path) == [(line, col, "", f"lists and mappings nest more than {MAX_DEPTH} levels deep here")]


def test_file_size_is_bounded(project: Path) -> None:
    path = _spec(project, GENERATION, f"{GENERATION}\n# {'x' * (1 << 20)}")
    ((line, col, field, message),) = _problems(path)
    assert (line, col, field) == (1, 1, "") and message.startswith("larger than 1 MiB")


def test_a_spec_that_is_not_a_file_is_refused(project: Path) -> None:
    (project / "specs" / "llava.yaml").unlink()
    (project / "specs" / "llava.yaml").mkdir()
    assert _problems(project / "specs" / "llava.yaml") == [(1, 1, "", "not a regular file: a spec is a YAML file")]


# -- bytes and characters ------------------------------------------------------------------------------------------


def test_non_utf8_bytes_name_their_line_and_column(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = project / "specs" / "llava.yaml"
    path.write_bytes(path.read_bytes().replace(b'placeholder: "<image>"', b'placeholder: "<\xc3\xa9\xffimage>"'))
    expected_line = path.read_bytes().split(b"\n").index(b'  placeholder: "<\xc3\xa9\xffimage>"') + 1
    assert _problems(path) == [
        (expected_line, 19, "", "byte 0xff is not UTF-8 text: save the spec as UTF-8")
    ]  # column 19 counts the é before it as one character
    code, err = _check(project, capsys)
    assert code == EXIT_INPUT and f"specs/llava.yaml:{expected_line}:19: <spec>: byte 0xff" in err


@pytest.mark.parametrize(("char", "escape"), [("\x01", "\\x01"), ("\x7f", "\\x7f"), ("\ufffe", "\\ufffe")])
def test_control_characters_name_their_place_and_the_escape(project: Path, char: str, escape: str) -> None:
    path = _spec(project, 'placeholder: "<image>"', f'placeholder: "<im{char}age>"')
    line = _line_of(path, "placeholder:")
    assert _problems(path) == [
        (
            line,
            20,
            "",
            f"character U+{ord(char):04X} is not allowed in YAML; inside a double-quoted string write it as {escape}",
        )
    ]


def test_every_value_the_emitter_cannot_write_is_named_at_once(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = project / "pwned"
    values = (
        "generation:\n"
        "  max_new_tokens: 1024\n"
        '  lone: "\\ud800"\n'
        "  day: 2024-01-01\n"
        "  blob: !!binary aGVsbG8=\n"
        "  bag: !!set {a, b}\n"
        f"  huge: 1{'0' * 5000}\n"
        "  ? [a, b]\n"
        "  : 1\n"
        f"  run: !!python/object/apply:os.system ['touch {marker}']\n"
        "  odd: !!float abc\n"
    )
    path = _spec(project, GENERATION, values.rstrip("\n"))
    found = {field or message: (line, col, message) for line, col, field, message in _problems(path)}
    first = _line_of(path, "lone:")
    assert {field: place[:2] for field, place in found.items()} == {
        "generation.lone": (first, 9),
        "generation.day": (first + 1, 8),
        "generation.blob": (first + 2, 9),
        "generation.bag": (first + 3, 8),
        "generation.huge": (first + 4, 9),
        "generation": (first + 5, 5),
        "generation.run": (first + 7, 8),
        "generation.odd": (first + 8, 8),
    }
    assert "lone surrogate \\ud800" in found["generation.lone"][2]
    assert "'2024-01-01' is not JSON data" in found["generation.day"][2] and "quote it" in found["generation.day"][2]
    assert "bytes (!!binary)" in found["generation.blob"][2]
    assert "a set (!!set); write a list" in found["generation.bag"][2]
    assert "(5001 characters) is out of range: integers in a spec fit in 64 bits" in found["generation.huge"][2]
    assert "a list as a mapping key" in found["generation"][2]
    assert "tag !!python/object/apply:os.system is not allowed" in found["generation.run"][2]
    assert "'abc' is not a number" in found["generation.odd"][2]
    code, err = _check(project, capsys)
    assert code == EXIT_INPUT and err.count("specs/llava.yaml:") == 8 and "Traceback" not in err
    assert not marker.exists()


def test_integers_beyond_64_bits_are_refused_in_any_notation(project: Path) -> None:
    path = _spec(project, GENERATION, "generation: {max_new_tokens: 0x8000000000000000, seed: -9223372036854775808}")
    ((_, _, field, message),) = _problems(path)
    assert field == "generation.max_new_tokens" and "0x8000000000000000 is out of range" in message


# -- YAML syntax: where the construct began and where the parser gave up ------------------------------------------


def test_unclosed_bracket_is_placed_at_the_bracket(project: Path) -> None:
    """PyYAML gives up at the next line's ':'; the error points at the '[' and names where it gave up."""
    targets = "  targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
    path = _spec(project, targets, "  targets: [q_proj, k_proj")
    ((line, col, field, message),) = _problems(path)
    assert (line, col, field) == (_line_of(path, "targets:"), 12, "")
    assert message.startswith("invalid YAML: while parsing a flow sequence that starts here, expected ',' or ']'")
    assert message.endswith(f"at line {_line_of(path, 'image:')}, column 6")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: llava\nlora:\n  targets: [q_proj, k_proj,\n",
            (
                3,
                12,
                "invalid YAML: expected the node content, but found '<stream end>' at line 4, column 1, "
                "inside the '[' here",
            ),
        ),
        (
            "name: llava\ntiny:\n  config: {a: 1,\n",
            (
                3,
                11,
                "invalid YAML: expected the node content, but found '<stream end>' at line 4, column 1, "
                "inside the '{' here",
            ),
        ),
        (
            'name: llava\nimage:\n  placeholder: "<image>\n',
            (
                3,
                16,
                "invalid YAML: while scanning a quoted scalar that starts here, found unexpected end of stream "
                "at line 4, column 1",
            ),
        ),
        (
            "name: llava\nimage:\n\tplaceholder: x\n",
            (
                3,
                1,
                "invalid YAML: while scanning for the next token: found character '\\t' that cannot start any "
                "token; indent with spaces",
            ),
        ),
        (
            "name: llava\nimage:\n  placeholder: x\n token: y\n",
            (
                4,
                2,
                "invalid YAML: expected <block end>, but found '<block mapping start>' (while parsing a block mapping "
                "that starts at line 1, column 1)",
            ),
        ),
    ],
    ids=["bracket", "brace", "quote", "tab", "indent"],
)
def test_yaml_syntax_errors_point_at_what_was_left_open(project: Path, text: str, expected) -> None:
    """An unclosed bracket or quote pointed at the end of the file, where the parser gave up; now at where it
    opened. A block (indentation) error stays where the parser gave up, naming where the block began."""
    path = project / "specs" / "llava.yaml"
    path.write_text(text)
    assert _problems(path) == [(expected[0], expected[1], "", expected[2])]


def test_duplicate_keys_are_all_named(project: Path) -> None:
    path = _spec(project, "flash_attention: true", "flash_attention: true\nflash_attention: false\nposition_ids: 3d")
    fields = [(field, message) for _, _, field, message in _problems(path)]
    first = _line_of(path, "flash_attention:")
    assert fields == [
        ("flash_attention", f"duplicate key 'flash_attention' (first at line {first})"),
        ("position_ids", f"duplicate key 'position_ids' (first at line {first + 2})"),
    ]


# -- names: reserved, colliding, dunder --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("registry", "'registry' is reserved: generated/registry.py is the compiler's own file"),
        ("__init__", "is a dunder name"),
        ("_private", "adapter names start with a letter"),
    ],
)
def test_reserved_adapter_names_are_spec_errors(
    project: Path, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    path = _spec(project, "name: llava", f"name: {name}", name=name)
    (project / "specs" / "llava.yaml").unlink()
    ((line, col, field, text),) = _problems(path)
    assert (line, col, field) == (_line_of(path, "name:"), 7, "name") and message in text
    code, err = _check(project, capsys)
    assert code == EXIT_INPUT and f"specs/{name}.yaml:{line}:7: name: " in err
    assert main(["scaffold", "--project", str(project)]) == EXIT_INPUT
    assert not (project / "generated" / name).exists()


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ("model_class: LlavaForConditionalGeneration", "model_class: __import__", "model_class", "dunder name"),
        (
            "  vision_tower: model.vision_tower",
            "  vision_tower: model.__class__.b",
            "modules.vision_tower",
            "segment '__class__' is a dunder name",
        ),
        ("  targets: [q_proj,", "  targets: [__init__,", "lora.targets.0", "dunder name"),
        (
            "processor_class: LlavaProcessor",
            'processor_class: "LlavaProcessor\\n"',
            "processor_class",
            "is not a Python identifier",
        ),
        ('transformers: ">=5.20,<6"', 'transformers: ">=5.20,<6\\n"', "transformers", "is not a version range"),
        (GENERATION, "generation: {__class__: 1}", "generation.__class__", "dunder name"),
    ],
    ids=["class", "dotted-path", "lora-target", "trailing-newline", "version-newline", "kwarg"],
)
def test_dunder_and_malformed_names_are_spec_errors(project: Path, old, new, field, message) -> None:
    path = _spec(project, old, new)
    ((line, _, found, text),) = _problems(path)
    assert (line, found) == (_line_of(path, new.strip().split(":")[0] + ":"), field)
    assert message in text


def test_dunder_override_module_is_a_spec_error(project: Path) -> None:
    overrides = "overrides:\n  module: os.__builtins__\n  hooks: [processor.format_multimodal_prompt]\n"
    path = _spec(project, "\n# A tiny", "\n" + overrides + "\n# A tiny")
    ((line, col, field, message),) = _problems(path)
    assert (line, col, field) == (_line_of(path, "module: os"), 11, "overrides.module")
    assert "segment '__builtins__' is a dunder name" in message


def test_two_specs_claiming_one_architecture(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = _spec(project, "name: llava", "name: llava_copy", name="llava_copy")
    with pytest.raises(SpecError) as info:
        codegen.plan(project)
    ((problem),) = info.value.problems
    line = _line_of(copy, "architectures:")
    original = _line_of(project / "specs" / "llava.yaml", "architectures:")
    assert (problem.file, problem.line, problem.col, problem.field) == (
        "specs/llava_copy.yaml",
        line,
        17,
        "architectures.0",
    )
    assert problem.message.startswith(
        f"'LlavaForConditionalGeneration' is also claimed by specs/llava.yaml:{original} (adapter 'llava')"
    )
    code, err = _check(project, capsys)
    assert code == EXIT_INPUT and f"specs/llava_copy.yaml:{line}:17: architectures.0: " in err


def test_one_architecture_listed_twice(project: Path) -> None:
    arch = "architectures: [LlavaForConditionalGeneration]"
    path = _spec(project, arch, "architectures: [LlavaForConditionalGeneration, LlavaForConditionalGeneration]")
    with pytest.raises(SpecError, match=r"architectures\.1: 'LlavaForConditionalGeneration' is listed twice"):
        codegen.load_specs([path], project)


# -- values the schema refuses where they mean nothing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        (GENERATION, "generation: {max_new_tokens: 1024, temperature: .inf}", "generation.temperature"),
        (GENERATION, "generation: {max_new_tokens: 1024, temperature: 1.0e+400}", "generation.temperature"),
        (GENERATION, "generation: {max_new_tokens: 1024, top_p: [0.5, .nan]}", "generation.top_p.1"),
        (
            "    image_seq_length: 16",
            "    image_seq_length: 16\n    initializer_range: -.inf",
            "tiny.config.initializer_range",
        ),
    ],
    ids=["inf", "overflow", "nested-nan", "tiny-config"],
)
def test_non_finite_floats_are_spec_errors(project: Path, old: str, new: str, field: str) -> None:
    path = _spec(project, old, new)
    ((line, _, found, message),) = _problems(path)
    assert found == field and "is not a finite number" in message
    assert line == _line_of(path, new.strip().splitlines()[-1].split(":")[0] + ":")
