"""Every row's length is known before the first step (resonance.algorithms.lengths.fit_rows): over-long rows are
named all at once, or dropped up front with --skip_long_rows, so no run ends at step 13 on a long row and no batch
can be empty."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from helpers import load_adapter, train_argv, write_jsonl
from PIL import Image

from resonance.algorithms import setup
from resonance.algorithms.lengths import fit_rows
from resonance.cli import main
from resonance.commands.train import build_trainer, parse
from resonance.data.rows import load_rows
from resonance.errors import DataError

MAX_LENGTH = 128
LONG = "word " * 200  # a few hundred tokens


def _sft(question: str = "What colour is it?") -> dict[str, Any]:
    return {
        "image": "red.png",
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "Red."}],
    }


def _pair(chosen: str = "Red.", rejected: str = "Blue.") -> dict[str, Any]:
    return {"image": "red.png", "prompt": "What colour is it?", "chosen": chosen, "rejected": rejected}


# Per algorithm: rows 2 and 4 too long (a preference row by its chosen answer, then by its rejected one).
DATA = {
    "sft": [_sft(), _sft(LONG), _sft(), _sft(LONG)],
    "dpo": [_pair(), _pair(chosen=LONG), _pair(), _pair(rejected=LONG)],
    "rm": [_pair(), _pair(chosen=LONG), _pair(), _pair(rejected=LONG)],
}


def _data(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.mark.parametrize("algorithm", DATA)
def test_every_long_row_is_named_before_the_model_loads(
    algorithm: str, tmp_path: Path, tiny_checkpoint, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """Before: the run died when the first long row's batch came up, naming that row only, weights unsaved."""

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model loaded before the rows were measured")

    monkeypatch.setattr(setup, "load_model", no_model)
    data = _data(tmp_path, DATA[algorithm])
    argv = train_argv(algorithm, tiny_checkpoint("llava"), data, tmp_path / "out", max_length=MAX_LENGTH)
    assert main(["train", algorithm, *argv]) == 2
    err = capsys.readouterr().err
    assert f"error: 2 of 4 rows are longer than --max_length {MAX_LENGTH}" in err and "--skip_long_rows" in err
    for line in (2, 4):
        assert f"{data}:{line}: " in err and f"tokens > --max_length {MAX_LENGTH}" in err
    assert f"{data}:1:" not in err and f"{data}:3:" not in err
    assert "Traceback" not in err and not any((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize("algorithm", DATA)
def test_skip_long_rows_drops_them_up_front_with_batch_size_one(
    algorithm: str, tmp_path: Path, tiny_checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: with one row per batch, a long row was a batch of nothing but long rows, and ended the run."""
    data = _data(tmp_path, DATA[algorithm])
    argv = train_argv(
        algorithm,
        tiny_checkpoint("llava"),
        data,
        tmp_path / "out",
        max_length=MAX_LENGTH,
        skip_long_rows=True,
        per_device_train_batch_size=1,
        max_steps=4,
    )
    with caplog.at_level(logging.WARNING, logger="resonance.data"):
        trainer, _ = build_trainer(algorithm, *parse(algorithm, argv))
    assert trainer.train_dataset["source"] == [f"{data}:1", f"{data}:3"]
    (line,) = [r.getMessage() for r in caplog.records if "--skip_long_rows" in r.getMessage()]
    assert line.startswith(f"dropped 2 of 4 rows longer than --max_length {MAX_LENGTH} (--skip_long_rows): {data}:2 (")
    assert trainer.data_collator.skipped_rows == 2
    trainer.train()
    assert trainer.state.global_step == 4


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_the_limit_is_the_collated_length_exactly(family: str, kind: str, tmp_path: Path, tiny_checkpoint) -> None:
    """A row of exactly --max_length tokens is kept and one token more is refused: the estimate never decides alone
    near the limit."""
    mapper, processor = load_adapter(tiny_checkpoint(family))
    rows = load_rows(_data(tmp_path, [_sft() if kind == "sft" else _pair()]), kind)
    collator_cls = mapper.sft_collator if kind == "sft" else mapper.dpo_collator
    (length,) = collator_cls(processor).lengths([rows[0]])

    assert len(fit_rows(rows, collator_cls(processor, max_length=length), skip_invalid_rows=False)) == 1
    with pytest.raises(DataError) as info:
        fit_rows(rows, collator_cls(processor, max_length=length - 1), skip_invalid_rows=False)
    assert info.value.errors == [
        (f"{tmp_path / 'train.jsonl'}:1", f"{length} tokens > --max_length {length - 1} (image tokens included)")
    ]


def test_all_rows_too_long_is_an_error_even_when_skipping(tmp_path: Path, tiny_checkpoint) -> None:
    mapper, processor = load_adapter(tiny_checkpoint("llava"))
    rows = load_rows(_data(tmp_path, [_sft(LONG), _sft(LONG)]), "sft")
    with pytest.raises(DataError, match=r"no rows left: .* would drop all 2 rows"):
        fit_rows(rows, mapper.sft_collator(processor, max_length=MAX_LENGTH, skip_long_rows=True), False)
