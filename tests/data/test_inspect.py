"""resonance.data.inspect: the computations behind ``resonance data inspect`` without a model family: the kind
guess, reading a file whose rows are all invalid, image counts, percentiles, sampling, token runs, thumbnails, and
the page's escaping. The command with real families: tests/commands/test_data_inspect.py."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from helpers import make_image, save_png, write_jsonl
from PIL import Image

from resonance.data.inspect import (
    ConversationView,
    FamilyReport,
    SampleView,
    Segment,
    guess_kind,
    image_stats,
    length_stats,
    read_for_inspection,
    render_page,
    sample_indices,
    thumbnail_uri,
    token_segments,
)
from resonance.data.rows import LoadedRows
from resonance.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("keys", "kind"),
    [
        (["images", "prompt", "chosen", "rejected"], "preference"),
        (["conversations", "chosen", "rejected"], "preference"),  # LLaMA-Factory's sharegpt DPO
        (["messages", "rejected_response"], "preference"),  # ms-swift DPO
        (["images", "conversations"], "sft"),
        (["messages"], "sft"),
        (["prompt", "completion"], "sft"),
        (["prompt"], "prompt"),
        (["something", "else"], "sft"),  # no format claims it: the loader says why, as SFT
    ],
)
def test_guess_kind(keys: list[str], kind: str) -> None:
    assert guess_kind(keys) == kind


def test_rows_all_invalid_are_reported_not_raised(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "robot", "value": "Hi"}]}, {"conversations": []}]
    data = read_for_inspection(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert (data.kind, data.rows, data.skipped) == ("sft", [], 2)
    assert [source for source, _ in data.problems] == [f"{tmp_path / 'bad.jsonl'}:{line}" for line in (1, 2)]


def test_a_file_that_cannot_be_read_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_for_inspection(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        read_for_inspection(tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match="--kind must be one of auto, sft, preference, prompt, got 'rm'"):
        read_for_inspection(tmp_path / "empty.jsonl", "rm")


def test_image_stats(tmp_path: Path) -> None:
    small = save_png(tmp_path, "small.png", make_image(40, 30))
    wide = save_png(tmp_path, "wide.png", make_image(90, 20))  # 1800 pixels: more than 64 x 24 = 1536
    tall = save_png(tmp_path, "tall.png", make_image(24, 64))
    rows = [{"images": []}, {"images": [small]}, {"images": [small, wide, tall]}, {"images": [small]}]
    stats = image_stats(rows)
    assert stats.rows_with == {"0": 1, "1": 2, "2+": 1}
    assert (stats.total, stats.distinct, stats.largest) == (5, 3, (wide, 90, 20))
    assert image_stats([{"images": []}]).largest is None


def test_length_stats_are_observed_lengths() -> None:
    stats = length_stats(list(range(1, 101)))  # 1..100: the nearest-rank percentiles are the values themselves
    assert stats is not None and (stats.rows, stats.p50, stats.p90, stats.p99, stats.max) == (100, 50, 90, 99, 100)
    stats = length_stats([7, 300, 12])
    assert stats is not None and (stats.p50, stats.p90, stats.p99, stats.max) == (12, 300, 300, 300)
    assert length_stats([]) is None


def test_sample_indices_spread_over_the_file() -> None:
    assert sample_indices(100, 4) == [0, 25, 50, 75]
    assert sample_indices(3, 8) == [0, 1, 2]
    assert sample_indices(10, 0) == []


def test_token_segments_collapse_images_and_keep_characters_whole() -> None:
    vocab = {1: "<s>", 2: "Hi", 3: " there", 9: "<image>"}
    # A character split over two tokens (UTF-8 of "é" is C3 A9): decoded together, as one token on the page.
    pieces = {4: b"\xc3", 5: b"\xa9"}

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] if i in pieces else vocab[i].encode() for i in ids).decode("utf-8", "replace")

    ids = [1, 9, 9, 9, 2, 3, 4, 5, 2]
    supervised = [False, False, False, False, False, True, True, True, False]
    assert token_segments(ids, supervised, 9, decode) == [
        Segment("prompt", ("<s>",), 1),
        Segment("image", (), 3),
        Segment("prompt", ("Hi",), 1),
        Segment("supervised", (" there", "é"), 3),
        Segment("prompt", ("Hi",), 1),
    ]


@pytest.mark.parametrize("suffix", ["png", "jpeg"])
def test_thumbnail_is_a_small_data_uri(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"big.{suffix}"
    make_image(400, 200).save(path)
    uri = thumbnail_uri(str(path))
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.removeprefix("data:image/png;base64,")))) as thumb:
        assert thumb.format == "PNG" and thumb.size == (160, 80)


def test_page_escapes_everything_from_the_data(tmp_path: Path) -> None:
    hostile = '<script>alert("x")</script>'
    image = save_png(tmp_path, "a.png", make_image(40, 30))
    data = LoadedRows(
        path=f"data{hostile}.jsonl",
        kind="sft",
        format="sharegpt",
        rows=[{"images": [image], "source": "s:1"}],
        skipped=1,
        problems=[(f"data{hostile}.jsonl:2", f"unknown value {hostile!r}")],
        unused={hostile: 3},
    )
    families = [FamilyReport("ckpt", "llava", length_stats([5, 9]), [("s:1", hostile)])]
    conversation = ConversationView("conversation", [Segment("supervised", (hostile, "</mark>"), 2)])
    samples = [SampleView("s:1", [(image, 40, 30, thumbnail_uri(image))], {"ckpt (llava)": [conversation]})]
    page = render_page(data, image_stats(data.rows), families, samples, max_problems=1)

    assert "<script" not in page and "&lt;script&gt;" in page and "&lt;/mark&gt;" in page
    assert "ckpt: &lt;script&gt;" not in page  # --max_problems 1: the family's problem is counted, not listed
    assert "(first 1 of 2)" in page
