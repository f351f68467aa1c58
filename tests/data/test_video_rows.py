"""Rows with videos: every data format reads ``video`` / ``videos`` fields, ``<video>`` placeholders and video parts
(a video file, or a list of frame images) into canonical rows; a datasets ``Video`` feature too; bad videos are named
by row and field; a family without a spec ``video:`` section refuses a video row by name, never drops it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pytest
from helpers import read_spec, write_jsonl
from helpers.video import NO_VIDEO_FAMILY, VIDEO_FAMILIES, least_frames, write_clip, write_frames
from PIL import Image

from resonance.data.images import ImageCount
from resonance.data.rows import load_rows, read_rows
from resonance.errors import DataError

VIDEO = {"type": "video", "text": None}
IMAGE = {"type": "image", "text": None}


def txt(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


@pytest.fixture
def clip(tmp_path: Path) -> str:
    return write_clip(tmp_path, "clip.mp4")


def problems_of(excinfo: pytest.ExceptionInfo[DataError]) -> list[str]:
    return [f"{source}: {message}" for source, message in excinfo.value.errors]


# Every format the readers take, one row each with a <video> placeholder and its video in "videos".
Q, A, B = "<video>What happens?", "A square moves.", "Nothing."
FORMAT_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "sharegpt": ("sft", {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]}),
    "messages": ("sft", {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]}),
    "trl_prompt_completion": (
        "sft",
        {"prompt": [{"role": "user", "content": Q}], "completion": [{"role": "assistant", "content": A}]},
    ),
    "swift_sharegpt": ("sft", {"conversation": [{"human": Q, "assistant": A}]}),
    "swift_query": ("sft", {"query": Q, "response": A}),
    "alpaca": ("sft", {"instruction": Q, "output": A}),
    "trl_preference": ("preference", {"prompt": Q, "chosen": A, "rejected": B}),
    "sharegpt_preference": (
        "preference",
        {
            "conversations": [{"from": "human", "value": Q}],
            "chosen": {"from": "gpt", "value": A},
            "rejected": {"from": "gpt", "value": B},
        },
    ),
    "swift_preference": (
        "preference",
        {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}], "rejected_response": B},
    ),
    "trl_implicit_preference": (
        "preference",
        {
            "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
            "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": B}],
        },
    ),
    "trl_prompt": ("prompt", {"prompt": Q}),
}


@pytest.mark.parametrize("name", sorted(FORMAT_ROWS))
def test_every_format_reads_a_video(name: str, tmp_path: Path, clip: str) -> None:
    kind, row = FORMAT_ROWS[name]
    loaded = read_rows(write_jsonl(tmp_path / "d.jsonl", [{**row, "videos": ["clip.mp4"]}]), kind)  # type: ignore[arg-type]
    assert loaded.format == name
    [canonical] = loaded.rows
    assert canonical["videos"] == [{"path": clip, "frames": []}]
    assert canonical["images"] == []
    first = canonical["messages" if kind == "sft" else "prompt"]
    user = next(m for m in first if m["role"] == "user")
    assert user["content"] == [VIDEO, txt("What happens?")]


def test_a_video_in_every_spelling(tmp_path: Path, clip: str) -> None:
    """A file or frame list, in ``video`` / ``videos``, in a part (``video``, ``path``, ``url``, ``video_url``), with
    or without a placeholder (then at the start of the first user message, after its images)."""
    frames = write_frames(tmp_path, "frames", 4)
    relative = [str(Path(f).relative_to(tmp_path)) for f in frames]
    user, answer = "What happens?", {"role": "assistant", "content": "It moves."}
    rows = [
        {"messages": [{"role": "user", "content": "<video>" + user}, answer], "video": "clip.mp4"},
        {"messages": [{"role": "user", "content": "<video>" + user}, answer], "video": relative},
        {"messages": [{"role": "user", "content": "<video>\n" + user}, answer], "videos": [relative]},
        {"messages": [{"role": "user", "content": user}, answer], "videos": ["clip.mp4", relative]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, txt(user)]}, answer]},
        {"messages": [{"role": "user", "content": [{"type": "video", "path": relative}, txt(user)]}, answer]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip}}, txt(user)]},
                answer,
            ]
        },
        {"messages": [{"role": "user", "content": "<image>" + user}, answer], "images": [frames[0]], "video": clip},
    ]
    loaded = read_rows(write_jsonl(tmp_path / "d.jsonl", rows), "sft")
    file, listed = {"path": clip, "frames": []}, {"path": None, "frames": frames}
    assert [row["videos"] for row in loaded.rows] == [
        [file],
        [listed],
        [listed],
        [file, listed],
        [file],
        [listed],
        [file],
        [file],
    ]
    contents = [row["messages"][0]["content"] for row in loaded.rows]
    assert contents[:3] == [[VIDEO, txt(user)]] * 3
    assert contents[3] == [VIDEO, VIDEO, txt(user)]
    assert contents[7] == [IMAGE, VIDEO, txt(user)]
    dataset = loaded.to_dataset()
    assert dataset[1]["videos"] == [listed] and dataset[0]["messages"][0]["content"] == [VIDEO, txt(user)]


def test_rows_without_videos_get_an_empty_videos_column_where_others_have_one(tmp_path: Path, clip: str) -> None:
    rows = [
        {
            "messages": [{"role": "user", "content": "<video>Hi"}, {"role": "assistant", "content": "Yo."}],
            "video": clip,
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]},
    ]
    dataset = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), "sft")
    assert dataset["videos"] == [[{"path": clip, "frames": []}], []]
    text_only = load_rows(write_jsonl(tmp_path / "t.jsonl", rows[1:]), "sft")
    assert "videos" not in text_only.column_names  # text and image rows keep their schema


def test_a_datasets_video_feature_reads_as_its_files(tmp_path: Path, clip: str) -> None:
    """datasets' Video feature (stored undecoded: a path, or the file's bytes) gives the same canonical video."""
    messages = [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "It moves."}]
    data = datasets.Dataset.from_dict({"messages": [messages], "videos": [[clip]]})
    data = data.cast_column("videos", datasets.List(datasets.Video()))
    data.save_to_disk(str(tmp_path / "saved"))
    [row] = read_rows(tmp_path / "saved", "sft").rows
    [video] = row["videos"]  # save_to_disk embeds the file: its bytes come back as a file of the store
    assert video["frames"] == [] and Path(video["path"]).read_bytes() == Path(clip).read_bytes()

    embedded = datasets.Dataset.from_dict(
        {"messages": [messages], "videos": [[{"bytes": Path(clip).read_bytes(), "path": "clip.mp4"}]]}
    ).cast_column("videos", datasets.List(datasets.Video(decode=False)))
    embedded.to_parquet(str(tmp_path / "embedded.parquet"))
    [row] = read_rows(tmp_path / "embedded.parquet", "sft").rows
    [video] = row["videos"]
    assert video["path"].endswith(".mp4") and Path(video["path"]).read_bytes() == Path(clip).read_bytes()


def test_bad_videos_are_named_by_row_and_field(tmp_path: Path, clip: str) -> None:
    (tmp_path / "notes.mp4").write_text("not a video")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 32)).save(tmp_path / "b.png")
    ask = [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "x"}]
    rows = [
        {"messages": ask, "video": "missing.mp4"},
        {"messages": ask, "video": "notes.mp4"},
        {"messages": ask, "video": ["a.png", "b.png"]},
        {"messages": ask, "video": []},
        {"messages": ask, "video": clip, "videos": [clip]},
        {"messages": ask, "videos": [clip, clip]},
        {
            "messages": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "<video>x"}],
            "video": clip,
        },
        {"messages": ask, "video": "https://example.com/v.mp4"},
        {"messages": ask, "video": ["a.png"]},
        {"messages": ask, "video": write_clip(tmp_path, "one.mp4", count=1)},
        {"messages": ask, "videos": clip},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": clip}]}, ask[1]], "video": clip},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as excinfo:
        read_rows(path, "sft")
    found = problems_of(excinfo)
    expected = [
        f"{path}:1: video: video file not found: {tmp_path / 'missing.mp4'} (relative to the data file's folder",
        f"{path}:2: video: cannot be opened as a video: {tmp_path / 'notes.mp4'} (",
        f"{path}:3: video: the frames of a video must have one size; got [(16, 32), (32, 32)]",
        f"{path}:4: video: an empty list of frames; a video is the path of a video file",
        f"{path}:5: has both 'video' and 'videos'; keep one",
        f"{path}:6: 1 video placeholder(s) ('<video>' or video parts) but 2 video(s) in 'video' / 'videos'",
        f"{path}:7: messages[1]: video ('<video>' or a video part) in an assistant message; videos may only appear",
        f"{path}:8: video: 'https://example.com/v.mp4': videos are read from local files only",
        f"{path}:9: video: a list of 1 frame(s); a video needs at least 2 (a single frame is an image: give it in",
        f"{path}:10: video: {tmp_path / 'one.mp4'}: 1 frame(s); a video needs at least 2",
        f"{path}:11: videos: must be a list of videos (each a file, or a list of frames), got a string",
        f"{path}:12: videos given twice: 1 inside the messages and 1 in 'video' / 'videos'",
    ]
    assert len(found) == len(expected), found
    for problem, start in zip(found, expected, strict=True):
        assert problem.startswith(start), (problem, start)


def test_a_family_without_video_refuses_a_video_row_by_name(tmp_path: Path, clip: str) -> None:
    """Read for a family whose spec has no video: section, each video row is an error naming the row and the
    family (in the field, the text or a part: never the video dropped and its placeholder trained as text); with
    --skip_invalid_rows it is skipped and counted."""
    processor = importlib.import_module(f"resonance.generated.{NO_VIDEO_FAMILY}").core_mapper.processor
    answer = {"role": "assistant", "content": "x"}
    rows = [
        {"messages": [{"role": "user", "content": "<video>What?"}, answer], "videos": [clip]},
        {"messages": [{"role": "user", "content": "<video>What?"}, answer]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "gone.mp4"}, txt("What?")]}, answer]},
        {"messages": [{"role": "user", "content": "What?"}, answer]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    count = ImageCount.for_family(processor)
    with pytest.raises(DataError) as excinfo:
        read_rows(path, "sft", image_count=count)
    refusal = (
        f"1 video(s), but the model family {NO_VIDEO_FAMILY!r} takes no video (its spec has no video: section); "
        "remove the video, or pass --skip_invalid_rows to skip (and count) such rows"
    )
    assert problems_of(excinfo) == [f"{path}:{line}: {refusal}" for line in (1, 2, 3)]
    loaded = read_rows(path, "sft", image_count=count, skip_invalid=True)
    assert loaded.skipped == 3 and [row["source"] for row in loaded.rows] == [f"{path}:4"]


def test_data_inspect_names_the_video_rows_a_family_cannot_take(
    tmp_path: Path, clip: str, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """``resonance data inspect --model`` counts a video row's tokens for a family that takes video, and lists it
    among the rows a family without video cannot take (as training would refuse it)."""
    from typer.testing import CliRunner

    from resonance.cli import app

    answer = {"role": "assistant", "content": "It moves."}
    rows = [
        {"messages": [{"role": "user", "content": "<video>What happens?"}, answer], "videos": ["clip.mp4"]},
        {"messages": [{"role": "user", "content": "Hi"}, answer]},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    models = [
        arg for family in (NO_VIDEO_FAMILY, VIDEO_FAMILIES[0]) for arg in ("--model", str(tiny_checkpoint(family)))
    ]
    result = CliRunner().invoke(app, ["data", "inspect", str(data), *models])
    assert result.exit_code == 1, result.output  # 1: some rows are not valid for a model
    output = " ".join(result.output.split())  # rich wraps long lines
    assert (
        f"{data}:1: {tiny_checkpoint(NO_VIDEO_FAMILY)}: 1 video(s), but the model family {NO_VIDEO_FAMILY!r}" in output
    )
    assert f"{data}:2" not in output.split("problems:")[-1]


EQUAL_FRAMES_FAMILY = next(family for family in VIDEO_FAMILIES if least_frames(family))


def test_a_family_of_a_fixed_frame_count_names_shorter_videos_where_rows_are_read(tmp_path: Path) -> None:
    """A family whose processor stacks a batch's videos (spec video.sampling.equal_frames) needs num_frames frames
    in each: a shorter file or frame list is an error naming the row and the count, found when rows are read (from
    headers: the pixels are not decoded); a longer one is taken."""
    family = EQUAL_FRAMES_FAMILY
    needed = least_frames(family)
    processor = importlib.import_module(f"resonance.generated.{family}").core_mapper.processor
    ask = [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "x"}]
    short = needed - 1
    rows = [
        {"messages": ask, "video": write_clip(tmp_path, "short.mp4", count=short)},
        {"messages": ask, "video": write_frames(tmp_path, "short", short)},
        {"messages": ask, "video": write_clip(tmp_path, "long.mp4", count=needed + 3)},
        {"messages": ask, "video": write_frames(tmp_path, "long", needed + 3)},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as excinfo:
        read_rows(path, "sft", image_count=ImageCount.for_family(processor))
    stacked = (
        f"{short} frame(s); this model family's processor stacks a batch's videos, each of exactly {needed} frames "
        f"(spec video.sampling.num_frames with equal_frames), so a video needs at least {needed}"
    )
    assert problems_of(excinfo) == [
        f"{path}:1: video: {tmp_path / 'short.mp4'}: {stacked}",
        f"{path}:2: video: a list of {stacked}",
    ]
    assert len(read_rows(path, "sft").rows) == 4  # no family in mind: any count of 2 or more


def test_a_family_of_one_kind_per_call_names_rows_with_images_and_videos(tmp_path: Path, clip: str) -> None:
    """A family whose processor takes images or videos in one call (spec video.with_images: false, SmolVLM's) names
    a conversation holding both, when rows are read; rows of one kind are taken (a batch may mix them)."""
    family = next(name for name in VIDEO_FAMILIES if not read_spec(name)["video"].get("with_images", True))
    processor = importlib.import_module(f"resonance.generated.{family}").core_mapper.processor
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    answer = {"role": "assistant", "content": "x"}
    rows = [
        {"messages": [{"role": "user", "content": "<image><video>What?"}, answer], "images": ["a.png"], "video": clip},
        {"messages": [{"role": "user", "content": "<video>What?"}, answer], "video": clip},
        {"messages": [{"role": "user", "content": "<image>What?"}, answer], "images": ["a.png"]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as excinfo:
        read_rows(path, "sft", image_count=ImageCount.for_family(processor))
    assert problems_of(excinfo) == [
        f"{path}:1: 1 image(s) and 1 video(s), but this model family's processor takes images or videos in one call, "
        "not both (spec video.with_images: false); split the row, or pass --skip_invalid_rows to skip (and count) "
        "such rows"
    ]
    loaded = read_rows(path, "sft", image_count=ImageCount.for_family(processor), skip_invalid=True)
    assert loaded.skipped == 1 and len(loaded.rows) == 2
