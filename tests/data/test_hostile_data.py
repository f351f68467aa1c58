"""Hostile and broken data: rows no model family can render, rows this family cannot render, and images over the
pixel budget. Each is a row error naming FILE:LINE before the first step, dropped and counted with
--skip_invalid_rows, and its hint names the command-line flag."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from helpers import load_adapter, train_argv, write_jsonl
from PIL import Image, ImageFile

from resonance.algorithms.lengths import fit_rows
from resonance.cli import main
from resonance.commands.train import build_trainer, parse
from resonance.data.rows import load_rows, read_rows
from resonance.errors import ConfigError, DataError


def _png(path: Path, width: int, height: int) -> Path:
    """A black greyscale PNG of ``width`` x ``height`` written a row at a time: small on disk and in memory, however
    many pixels it holds (PIL would need the whole image in memory to save it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte 0, then one byte per pixel
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def red(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    return tmp_path / "red.png"


def _llava_row(*turns: tuple[str, str], image: str = "red.png") -> dict[str, Any]:
    return {"image": image, "conversations": [{"from": role, "value": text} for role, text in turns]}


GOOD = _llava_row(("human", "<image>\nWhat colour is it?"), ("gpt", "Red."))


# -- a conversation must start with the user ----------------------------------------------------------------------

ASSISTANT_FIRST: dict[str, tuple[str, dict[str, Any], str]] = {
    "llava": ("sft", _llava_row(("gpt", "Hello!"), ("human", "<image>\nWhat?"), ("gpt", "Red.")), "conversations[0]"),
    "chat": (
        "sft",
        {"images": ["red.png"], "messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}]},
        "messages[0]",
    ),
    "after_system": (
        "sft",
        _llava_row(("system", "Be brief."), ("gpt", "Hello!"), ("human", "<image>\nWhat?"), ("gpt", "Red.")),
        "conversations[1]",
    ),
    "preference_prompt": (
        "preference",
        {
            "image": "red.png",
            "prompt": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "<image>\nWhat?"}],
            "chosen": "Red.",
            "rejected": "Blue.",
        },
        "prompt[0]",
    ),
    "generation_prompt": ("prompt", _llava_row(("gpt", "Hello!"), ("human", "<image>\nWhat?")), "conversations[0]"),
}


@pytest.mark.parametrize("case", ASSISTANT_FIRST)
def test_assistant_turn_before_any_user_turn_is_a_row_error(tmp_path: Path, red: Path, case: str) -> None:
    kind, row, where = ASSISTANT_FIRST[case]
    good = {"image": "red.png", "prompt": "What?", "chosen": "Red.", "rejected": "Blue."} if kind != "sft" else GOOD
    path = write_jsonl(tmp_path / "d.jsonl", [good, row])
    with pytest.raises(DataError) as info:
        load_rows(path, kind)
    ((source, message),) = info.value.errors
    assert source == f"{path}:2"
    assert message.startswith(f"{where}: ") and "turn before any" in message, message
    header = str(info.value).splitlines()[0]
    assert "--skip_invalid_rows" in header and "skip_invalid=" not in header  # the flag, not the Python keyword

    loaded = read_rows(path, kind, skip_invalid=True)
    assert (len(loaded.rows), loaded.skipped) == (1, 1)


def test_assistant_first_row_is_skipped_and_training_runs(
    tmp_path: Path, red: Path, tiny_checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the row passed validation and training died on an IndexError naming no row, even when skipping."""
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD, ASSISTANT_FIRST["llava"][1], GOOD])
    argv = train_argv("sft", tiny_checkpoint("llava"), data, tmp_path / "out", skip_invalid_rows=True)
    with caplog.at_level(logging.WARNING, logger="resonance.data"):
        trainer, _ = build_trainer("sft", *parse("sft", argv))
    assert f"skipping invalid row {data}:2" in caplog.text
    assert trainer.train_dataset["source"] == [f"{data}:1", f"{data}:3"]
    trainer.train()
    assert trainer.state.global_step == 1


# -- roles the family's chat template cannot render ------------------------------------------------------------


def test_roles_the_chat_template_refuses_are_row_errors(tmp_path: Path, red: Path, tiny_checkpoint) -> None:
    """Gemma 3's template raises unless user and assistant alternate: each row it refuses is named, all at once."""
    mapper, processor = load_adapter(tiny_checkpoint("gemma3"))
    rows = [
        GOOD,
        _llava_row(("human", "<image>\nWhat?"), ("human", "Well?"), ("gpt", "Red.")),
        GOOD,
        _llava_row(("human", "<image>\nWhat?"), ("gpt", "Red."), ("gpt", "Or blue.")),
    ]
    data = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), "sft")
    with pytest.raises(DataError) as info:
        fit_rows(data, mapper.sft_collator(processor), skip_invalid_rows=False)
    assert [source for source, _ in info.value.errors] == [f"{tmp_path / 'd.jsonl'}:2", f"{tmp_path / 'd.jsonl'}:4"]
    assert all("must alternate" in message for _, message in info.value.errors)
    assert "--skip_invalid_rows" in str(info.value).splitlines()[0]

    kept = fit_rows(data, mapper.sft_collator(processor), skip_invalid_rows=True)
    assert kept["source"] == [f"{tmp_path / 'd.jsonl'}:1", f"{tmp_path / 'd.jsonl'}:3"]


def test_answer_as_suffix_family_needs_the_answer_last(tmp_path: Path, red: Path, tiny_checkpoint) -> None:
    """PaliGemma's processor takes the last turn as the answer: a conversation ending with a user turn is a row
    error up front (before: a ValueError naming no row when its batch came up)."""
    mapper, processor = load_adapter(tiny_checkpoint("paligemma"))
    rows = [GOOD, _llava_row(("human", "<image>\nWhat?"), ("gpt", "Red."), ("human", "Sure?"))]
    data = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), "sft")
    with pytest.raises(DataError) as info:
        fit_rows(data, mapper.sft_collator(processor), skip_invalid_rows=False)
    ((source, message),) = info.value.errors
    assert source == f"{tmp_path / 'd.jsonl'}:2" and "must end with the assistant turn" in message


# -- the pixel budget ------------------------------------------------------------------------------------------


@pytest.fixture
def never_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any decoding of pixels fails the test: the budget is checked from the header."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"{self.filename}: pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_huge_image_is_refused_by_row_before_decoding(tmp_path: Path, red: Path, never_decoded: None) -> None:
    huge = _png(tmp_path / "huge.png", 12000, 12000)
    assert huge.stat().st_size < 1_000_000  # 144 megapixels in a small file
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "image": "huge.png"}])
    with pytest.raises(DataError) as info:
        load_rows(path, "sft")
    assert info.value.errors == [
        (
            f"{path}:2",
            f"image: image {huge} is 12000 x 12000 = 144000000 pixels, over --max_image_pixels 40000000; shrink it, "
            "or raise --max_image_pixels (0: no limit)",
        )
    ]
    loaded = read_rows(path, "sft", skip_invalid=True)
    assert (len(loaded.rows), loaded.skipped) == (1, 1)


def test_no_pixel_limit_takes_the_image_unread(tmp_path: Path, red: Path, never_decoded: None) -> None:
    """0 lifts the budget, PIL's own decompression-bomb limit included (it would refuse 2 x 89 megapixels)."""
    _png(tmp_path / "huge.png", 20000, 10000)
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "image": "huge.png"}])
    assert len(load_rows(path, "sft", max_image_pixels=0)) == 1
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's limit is back for everyone else


def test_max_image_pixels_flag_reaches_the_loader(tmp_path: Path, red: Path, tiny_checkpoint) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD])
    argv = train_argv("sft", tiny_checkpoint("llava"), data, tmp_path / "out", max_image_pixels=1000)
    with pytest.raises(DataError, match=r"train.jsonl:1: image: image .*red.png is 40 x 30 = 1200 pixels, over "):
        build_trainer("sft", *parse("sft", argv))


def test_negative_pixel_budget_is_a_flag_error(tmp_path: Path, red: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ConfigError, match=r"--max_image_pixels must be a whole number of pixels >= 0"):
        load_rows(path, "sft", max_image_pixels=-1)


def test_over_budget_image_through_the_command_line(tmp_path: Path, red: Path, tiny_checkpoint, capsys) -> None:
    """One line per row, exit 2, no traceback."""
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD, {**GOOD, "image": str(_png(tmp_path / "big.png", 300, 200))}])
    argv = train_argv("sft", tiny_checkpoint("llava"), data, tmp_path / "out", max_image_pixels=50_000)
    assert main(["train", "sft", *argv]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: image: image {tmp_path / 'big.png'} is 300 x 200 = 60000 pixels" in err
    assert "Traceback" not in err


def test_threads_opening_images_leave_pils_own_limit_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """PIL's limit is one global that opening switches off. Without the lock, thread B saves A's 'off' while A is
    opening, A restores the real limit, then B restores 'off': every later open in the process is unguarded. The
    opens are made to interleave exactly that way (with the lock, B waits and A's wait for B times out)."""
    import threading

    from PIL import Image

    from resonance.data import images

    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    real_open = Image.open
    a_opening, b_opening, a_done = threading.Event(), threading.Event(), threading.Event()

    def interleaved_open(path, *args, **kwargs):
        if threading.current_thread().name == "A":
            a_opening.set()
            b_opening.wait(timeout=1)
        else:
            b_opening.set()
            a_done.wait(timeout=5)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images.Image, "open", interleaved_open)
    before = Image.MAX_IMAGE_PIXELS

    def a() -> None:
        assert images.image_problem(str(tmp_path / "small.png")) is None
        a_done.set()

    def b() -> None:
        assert images.image_problem(str(tmp_path / "small.png")) is None

    threads = [threading.Thread(target=a, name="A"), threading.Thread(target=b, name="B")]
    threads[0].start()
    assert a_opening.wait(timeout=5)  # A is inside the switch before B starts
    threads[1].start()
    for thread in threads:
        thread.join()
    assert before is not None and Image.MAX_IMAGE_PIXELS == before
