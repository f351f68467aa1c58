"""``resonance generate`` at its limits: every bad generation flag in one message before the model loads, an
unwritable output folder refused first, ``max_new_tokens`` capped to the model's positions with a warning, and no
temporary file left by a failure or a SIGTERM."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import generate_argv, write_jsonl
from typer.testing import CliRunner

import resonance.commands.generate as gen
import resonance.generation as generation
from resonance.base.collator import VLPromptCollator
from resonance.cli import app
from resonance.commands.flags import parse_generation_overrides
from resonance.data.rows import read_rows
from resonance.errors import EXIT_INPUT, ConfigError, RowError
from resonance.generation import generate_from, load_for_generation


def _prompts(folder: Path) -> Path:
    """Two text prompts; the second is the longer."""
    return write_jsonl(folder / "prompts.jsonl", [{"prompt": "Hi."}, {"prompt": "Tell me about the sea and the sky."}])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _no_model(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the model was loaded before the refusal")


# -- flags -------------------------------------------------------------------------------------------------------


def test_every_generation_flag_problem_in_one_message() -> None:
    args = ["--max_new_token", "3", "--temprature=0.5", "--max-new-tokens", "-1", "--do_sample", "true"]
    with pytest.raises(ConfigError) as caught:
        parse_generation_overrides([*args, "--temperature", "0", "--top_p"])
    lines = str(caught.value).splitlines()
    assert lines[0] == "5 problems with the flags of resonance generate:"
    assert lines[1].startswith("  unknown option --max_new_token: ") and lines[1].endswith(
        "did you mean --max_new_tokens?"
    )
    assert lines[2].startswith("  unknown option --temprature: ") and lines[2].endswith("did you mean --temperature?")
    assert "  --top_p needs a value" in lines
    assert "  --max_new_tokens -1: must be a whole number >= 1" in lines
    assert (
        "  --temperature 0: sampling needs a finite temperature > 0; for the most likely answer use greedy "
        "decoding (--do_sample false)"
    ) in lines


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_new_tokens_below_one_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^--max_new_tokens {value}: must be a whole number >= 1$"):
        parse_generation_overrides(["--max_new_tokens", value])


def test_temperature_zero_is_fine_for_greedy_decoding() -> None:
    assert parse_generation_overrides(["--temperature", "0", "--do_sample", "false"]) == {
        "temperature": 0,
        "do_sample": False,
    }


def test_cli_lists_every_unknown_generation_flag(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    output = tmp_path / "answers.jsonl"
    argv = generate_argv(tiny_checkpoint("llava"), _prompts(tmp_path), output, max_new_token=2, temprature=0.5)
    result = CliRunner().invoke(app, ["generate", *argv, "--overwrit"])
    assert result.exit_code == EXIT_INPUT, result.output
    assert "unknown option --max_new_token" in result.stderr and "did you mean --max_new_tokens?" in result.stderr
    assert "unknown option --temprature" in result.stderr and "did you mean --temperature?" in result.stderr
    assert "unknown option --overwrit" in result.stderr and "did you mean --overwrite?" in result.stderr
    assert not output.exists() and _leftovers(tmp_path) == []


def test_sampling_at_temperature_zero_is_refused_before_the_model_loads(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API path (overrides given directly) is checked with the family's defaults, before anything loads."""
    monkeypatch.setattr(gen, "load_for_generation", _no_model)
    output = tmp_path / "answers.jsonl"
    with pytest.raises(ConfigError, match=r"--temperature 0.0: sampling needs .* \(--do_sample false\)"):
        gen.run(
            str(tiny_checkpoint("llava")),
            str(_prompts(tmp_path)),
            output,
            overrides={"do_sample": True, "temperature": 0.0},
        )
    assert not output.exists() and _leftovers(tmp_path) == []


# -- the output ----------------------------------------------------------------------------------------------------


def test_unwritable_output_folder_is_refused_before_the_model_loads(
    tmp_path: Path,
    tiny_checkpoint: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Tests run as root, which chmod cannot stop: the folder refuses the temporary file as a read-only one would."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gen.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(gen, "load_core_mapper", _no_model)
    output = tmp_path / "answers.jsonl"
    code = gen.main(str(tiny_checkpoint("llava")), str(_prompts(tmp_path)), str(output), ["--max_new_tokens", "2"])
    assert code == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"error: --output {output}: cannot write in {tmp_path} (Permission denied)" in err


def test_output_gets_the_mode_of_an_ordinary_file(tmp_path: Path) -> None:
    """The temporary file (mkstemp: 0600) becomes the output: it gets what open() would give, 0666 less umask."""
    umask = os.umask(0o022)
    try:
        target = gen._AtomicOutput(tmp_path / "answers.jsonl", overwrite=False)
        target.write({"answer": "x"})
        target.commit()
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "answers.jsonl").stat().st_mode) == 0o644


def test_sigterm_midway_removes_the_temporary_file(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """The first row is written to the temporary file, then the process gets SIGTERM (``kill``): it exits 143
    and leaves neither the output nor the temporary file."""
    output = tmp_path / "answers.jsonl"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import resonance.commands.generate as gen

        real, calls = gen._generate_batch, []

        def killed(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)

        gen._generate_batch = killed
        sys.exit(gen.main({str(tiny_checkpoint("llava"))!r}, {str(_prompts(tmp_path))!r}, {str(output)!r},
                          ["--max_new_tokens", "2"], batch_size=1))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr[-3000:]
    assert not output.exists() and _leftovers(tmp_path) == []


# -- the model's positions -------------------------------------------------------------------------------------------


@pytest.fixture
def short_positions(tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch):
    """``(model, processor, batch, prompt_length, set_limit)`` for tiny LLaVA and the two prompts."""
    monkeypatch.setattr(generation, "_capped", set())  # warned once per (asked, limit): start afresh
    _, model, processor = load_for_generation(tiny_checkpoint("llava"), device="cpu")
    path = _prompts(tmp_path)
    rows = read_rows(path, "prompt", image_placeholder=processor.image_placeholder).rows
    batch = VLPromptCollator(processor)(rows)
    text_config = model.config.get_text_config()

    def set_limit(limit: int) -> None:
        monkeypatch.setattr(text_config, "max_position_embeddings", limit)

    return model, processor, batch, batch["inputs"]["input_ids"].shape[1], set_limit, path


def test_max_new_tokens_is_capped_to_the_positions_with_a_warning(
    short_positions, caplog: pytest.LogCaptureFixture
) -> None:
    model, processor, batch, length, set_limit, _ = short_positions
    set_limit(length + 3)
    with caplog.at_level(logging.WARNING, logger="resonance"):
        result = generate_from(model, processor, batch, {"max_new_tokens": 50, "min_new_tokens": 3})
    assert result.sequences.shape[1] == length + 3
    assert (
        f"max_new_tokens=50 does not fit the model's {length + 3} positions (max_position_embeddings) after a "
        f"prompt of {length} tokens: capped to 3"
    ) in caplog.text


def test_a_prompt_that_fills_every_position_names_its_row(short_positions) -> None:
    model, processor, batch, length, set_limit, path = short_positions
    set_limit(length)
    with pytest.raises(RowError, match=rf"^{path}:2: the prompt takes {length} tokens, all {length} positions"):
        generate_from(model, processor, batch, {"max_new_tokens": 5})
