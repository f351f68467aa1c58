"""Videos: token parity and labels against the family's own HF processor, for every family whose spec has a
``video:`` section, with short synthetic clips written here (an mp4 through PyAV, and a list of PNG frames).

The reference is the HF processor's ``apply_chat_template`` + call, given the decoded clip (transformers' own
``load_video``, every frame) with its metadata and the spec's frame sampling (``fps``), so the HF video processor
samples the frames itself; Resonance decodes only the frames the family samples and calls the processor with those.
A list of frames is a video sampled at the spec's ``frames_fps``, its frames used as given (``do_sample_frames``
off). Labels are checked against an independent reconstruction from the HF processor's prefixes. A family without
``video:`` refuses a video row by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import IGNORE_INDEX, is_blank_token, load_adapter, load_hf_processor, read_spec
from helpers.video import (
    NO_VIDEO_FAMILY,
    SHARED_TOKEN_FAMILIES,
    VIDEO_FAMILIES,
    least_frames,
    write_clip,
    write_frames,
)
from PIL import Image
from transformers.video_utils import VideoMetadata, load_video

from resonance.base.collator import VLDPODataCollatorWithPadding, VLSFTDataCollatorWithPadding
from resonance.data.videos import video_ref
from resonance.errors import RowError

VIDEO = {"type": "video", "text": None}
IMAGE = {"type": "image", "text": None}


def txt(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _conversations(family: str) -> list[list[dict[str, Any]]]:
    """Rows of different lengths: one video; and an image, a video and two answers. Where the family's processor
    takes images or videos in one call (spec video.with_images: false) the image is a third row's, so that the batch
    holds rows of both kinds."""
    together = read_spec(family)["video"].get("with_images", True)
    rows = [
        [
            {"role": "user", "content": [VIDEO, txt("What happens in the clip?")]},
            {"role": "assistant", "content": [txt("A white square moves right.")]},
        ],
        [
            {"role": "user", "content": [*([IMAGE] if together else []), VIDEO, txt("Same colours?")]},
            {"role": "assistant", "content": [txt("No.")]},
            {"role": "user", "content": [txt("And the square?")]},
            {"role": "assistant", "content": [txt("It is white.")]},
        ],
    ]
    if not together:
        rows.append(
            [
                {"role": "user", "content": [IMAGE, txt("Which colour?")]},
                {"role": "assistant", "content": [txt("Grey.")]},
            ]
        )
    return rows


def _joined(batches: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batches of the HF processor stacked row by row: token sequences padded with ``pad_id`` (the
    attention mask with 0), the rows' images or frames (pixel_values, pixel_attention_mask) with zero frames."""
    joined = {}
    for key in batches[0]:
        values = [torch.as_tensor(batch[key]) for batch in batches]
        width = max(value.shape[1] for value in values)
        fill = pad_id if key == "input_ids" else 0
        padded = [torch.cat([v, v.new_full((len(v), width - v.shape[1], *v.shape[2:]), fill)], dim=1) for v in values]
        joined[key] = torch.cat(padded)
    return joined


def _rows(tmp_path: Path, given: str, family: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows' videos, canonical (one per row), and the image of the second row; of different lengths, except for
    a family whose videos all have its fixed frame count (files then sampled to it, lists of exactly it)."""
    least = least_frames(family)
    if given == "file":
        videos = [
            video_ref(write_clip(tmp_path, "a.mp4", count=max(8, least), fps=4)),
            video_ref(write_clip(tmp_path, "b.mp4", max(6, least))),
        ]
    else:
        videos = [
            video_ref(frames=write_frames(tmp_path, "a", least or 4)),
            video_ref(frames=write_frames(tmp_path, "b", least or 2)),
        ]
    image = tmp_path / "cat.png"
    Image.fromarray(np.full((30, 40, 3), 90, dtype=np.uint8)).save(image)
    return videos, [str(image)]


def _reference_inputs(video: dict[str, Any], family: str) -> tuple[Any, VideoMetadata]:
    """What the HF reference is given for a video: every frame of the file (transformers' PyAV loader) and its
    metadata, or the frames as images with the frame rate the spec says a frame list was sampled at."""
    if video["path"] is not None:
        return load_video(video["path"], backend="pyav")
    frames = [Image.open(path).convert("RGB") for path in video["frames"]]
    fps = read_spec(family)["video"].get("sampling", {}).get("frames_fps", 2.0)
    count = len(frames)
    width, height = frames[0].size
    return frames, VideoMetadata(count, fps, width, height, count / fps, None, list(range(count)))


def _hf_batch(
    hf: Any, conversations: list[list[dict[str, Any]]], family: str, given: str, add_generation_prompt: bool = False
) -> Any:
    """The HF processor's batch for HF-format conversations (decoded videos and PIL images inside their parts),
    rendered as training renders them (TRL's training template where the spec says so)."""
    parts = [m["content"] for conv in conversations for m in conv if not isinstance(m["content"], str)]
    metadata = [part["metadata"] for content in parts for part in content if part["type"] == "video"]
    conversations = [
        [
            m
            if isinstance(m["content"], str)
            else {**m, "content": [{k: v for k, v in p.items() if k != "metadata"} for p in m["content"]]}
            for m in conv
        ]
        for conv in conversations
    ]
    kwargs: dict[str, Any] = {"padding": True, "padding_side": "right", "video_metadata": metadata}
    if given == "file":
        sampling = read_spec(family)["video"].get("sampling") or {}  # the video processor's own arguments of it
        kwargs.update({k: v for k, v in sampling.items() if k in ("fps", "num_frames")}, do_sample_frames=True)
    else:
        kwargs["do_sample_frames"] = False
    template = getattr(hf, "training_chat_template", None)  # spec chat_template.training: trl (Qwen3.5)
    return hf.apply_chat_template(
        conversations,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=kwargs,
        **({"chat_template": template} if template else {}),
    )


def _to_hf(
    conversation: list[dict[str, Any]],
    videos: list[tuple[Any, VideoMetadata]],
    images: list[Image.Image],
    text_as_string: bool = False,
) -> list[dict[str, Any]]:
    """HF-format messages; ``text_as_string``: a message of text only as one string (spec
    chat_template.text_messages: string, for templates that print a message's content as it is)."""
    videos, images = list(videos), list(images)
    out = []
    for message in conversation:
        parts = []
        for part in message["content"]:
            if part["type"] == "video":
                frames, metadata = videos.pop(0)
                parts.append({"type": "video", "video": frames, "metadata": metadata})
            elif part["type"] == "image":
                parts.append({"type": "image", "image": images.pop(0)})
            else:
                parts.append({"type": "text", "text": part["text"]})
        if text_as_string and all(part["type"] == "text" for part in parts):
            parts = "".join(part["text"] for part in parts)
        out.append({"role": message["role"], "content": parts})
    return out


def _expected_labels(hf: Any, conversation: list[dict[str, Any]], family: str, given: str) -> list[int]:
    """Positions to supervise, from the HF processor's prefixes: for each answer, from the end of the prefix with
    the generation prompt to the end of the prefix through the answer, less trailing blank tokens."""
    positions = []
    for k, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = _hf_batch(hf, [conversation[:k]], family, given, add_generation_prompt=True)["input_ids"][0]
        through = _hf_batch(hf, [conversation[: k + 1]], family, given)["input_ids"][0].tolist()
        end = len(through)
        while end and is_blank_token(hf, through[end - 1]):
            end -= 1
        positions.extend(range(len(before), end))
    return positions


@pytest.mark.parametrize("given", ["file", "frames"])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_batch_matches_the_hf_processor(
    family: str, given: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    videos, images = _rows(tmp_path, given, family)
    conversations = _conversations(family)
    row_images = [images if IMAGE in c[0]["content"] else [] for c in conversations]
    row_videos = [[videos[0]], [videos[1]], []][: len(conversations)]
    rows = [
        {"messages": c, "images": i, "videos": v, "source": f"a.jsonl:{n + 1}"}
        for n, (c, i, v) in enumerate(zip(conversations, row_images, row_videos, strict=True))
    ]
    batch = mapper.sft_collator(processor)(rows)

    hf_conversations = [
        _to_hf(
            c,
            [_reference_inputs(video, family) for video in v],
            [Image.open(path).convert("RGB") for path in i],
            processor.text_messages_as_string,
        )
        for c, i, v in zip(conversations, row_images, row_videos, strict=True)
    ]
    if len(conversations) == 2:
        reference = _hf_batch(hf, hf_conversations, family, given)
    else:  # the HF processor takes rows of one kind per call: the video rows, then the image row
        reference = _joined(
            [_hf_batch(hf, hf_conversations[:2], family, given), _hf_batch(hf, hf_conversations[2:], family, given)],
            hf.tokenizer.pad_token_id,
        )
    video_names = processor.video_input_names()
    assert set(video_names) <= set(reference) and set(video_names) <= set(batch)
    for key in reference:
        torch.testing.assert_close(torch.as_tensor(batch[key]), torch.as_tensor(reference[key]), rtol=0, atol=0)
    assert processor.video_token_mask(batch).sum() > 8  # each video expanded into its tokens

    for row, conversation in enumerate(hf_conversations):
        expected = _expected_labels(hf, conversation, family, given)
        supervised = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert supervised == expected
        assert (batch["labels"][row][supervised] == batch["input_ids"][row][supervised]).all()


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_dpo_batch_holds_the_prompt_videos_once(
    family: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """A preference batch: chosen rows then rejected rows, the video inputs those of the prompts once (as images),
    equal to the SFT batch's video inputs for the chosen rows."""
    mapper, processor = load_adapter(tiny_checkpoint(family))
    videos, _ = _rows(tmp_path, "file", family)
    prompt = [{"role": "user", "content": [VIDEO, txt("What happens?")]}]
    rows = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": [txt(chosen)]}],
            "rejected": [{"role": "assistant", "content": [txt("Nothing at all happens here.")]}],
            "images": [],
            "videos": [video],
            "source": f"p.jsonl:{i + 1}",
        }
        for i, (video, chosen) in enumerate(zip(videos, ["A square moves.", "It moves."], strict=True))
    ]
    batch = VLDPODataCollatorWithPadding.__call__(mapper.dpo_collator(processor), rows)
    sft = mapper.sft_collator(processor)(
        [{"messages": r["prompt"] + r["chosen"], "images": [], "videos": r["videos"], "source": "x"} for r in rows]
    )
    for name in processor.video_input_names():
        torch.testing.assert_close(torch.as_tensor(batch[name]), torch.as_tensor(sft[name]), rtol=0, atol=0)
    assert batch["input_ids"].shape[0] == 4 and batch["completion_mask"].sum() > 0
    videos = processor.video_token_mask(batch)
    assert videos.any() and not batch["completion_mask"][videos].any()


def test_a_family_without_video_refuses_a_video_row_by_name(tiny_checkpoint: Callable[[str], Path]) -> None:
    """A video row that reaches the collator some other way than the data reader is refused by name, its video
    never decoded (the file here does not exist)."""
    mapper, processor = load_adapter(tiny_checkpoint(NO_VIDEO_FAMILY))
    conversation = [{"role": "user", "content": [VIDEO, txt("What?")]}, {"role": "assistant", "content": [txt("x")]}]
    row = {"messages": conversation, "images": [], "videos": [video_ref("/nowhere/v.mp4")], "source": "d.jsonl:7"}
    with pytest.raises(RowError) as excinfo:
        VLSFTDataCollatorWithPadding.__call__(mapper.sft_collator(processor), [row])
    assert str(excinfo.value) == (
        f"d.jsonl:7: 1 video(s), but the model family {NO_VIDEO_FAMILY!r} takes no video (its spec has no video: "
        "section); remove the video, or pass --skip_invalid_rows to skip (and count) such rows"
    )


def test_an_unreadable_video_names_the_row(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    mapper, processor = load_adapter(tiny_checkpoint(VIDEO_FAMILIES[0]))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    conversation = [{"role": "user", "content": [VIDEO, txt("What?")]}, {"role": "assistant", "content": [txt("x")]}]
    row = {"messages": conversation, "images": [], "videos": [video_ref(str(broken))], "source": "d.jsonl:3"}
    with pytest.raises(RowError, match=rf"^d\.jsonl:3: cannot read video {broken}: "):
        VLSFTDataCollatorWithPadding.__call__(mapper.sft_collator(processor), [row])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_a_one_frame_video_names_the_row(family: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    """A video of one frame (which the reader refuses; here it reached the collator some other way) is an error
    naming the row, not the processor's own error about temporal patches."""
    mapper, processor = load_adapter(tiny_checkpoint(family))
    conversation = [{"role": "user", "content": [VIDEO, txt("What?")]}, {"role": "assistant", "content": [txt("x")]}]
    videos = [video_ref(frames=write_frames(tmp_path, "one", 1)), video_ref(write_clip(tmp_path, "one.mp4", count=1))]
    needed = max(2, least_frames(family))
    for video in videos:
        row = {"messages": conversation, "images": [], "videos": [video], "source": "d.jsonl:5"}
        with pytest.raises(RowError, match=rf"^d\.jsonl:5: .*1 frame\(s\); .*a video needs at least {needed}"):
            VLSFTDataCollatorWithPadding.__call__(mapper.sft_collator(processor), [row])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_the_first_half_s_video_inputs_of_videos_of_several_lengths(
    family: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """``first_half_images`` (a DPO batch's prompt videos, once) on rows [a, b, a, b] whose videos have 4 and 2 frames:
    the video inputs of rows [a, b], each layout cut where its own sizes say (grids, frame counts)."""
    mapper, processor = load_adapter(tiny_checkpoint(family))
    conversation = [{"role": "user", "content": [VIDEO, txt("What?")]}, {"role": "assistant", "content": [txt("x")]}]
    least = least_frames(family)  # a family of one frame count (equal_frames): its videos all have it
    videos = [
        video_ref(frames=write_frames(tmp_path, "a", least or 4)),
        video_ref(frames=write_frames(tmp_path, "b", least or 2)),
    ]
    rows = [{"messages": conversation, "images": [], "videos": [v], "source": "d:1"} for v in videos]
    half = processor.first_half_images(mapper.sft_collator(processor)(rows + rows))
    once = mapper.sft_collator(processor)(rows)
    assert set(half) == set(processor.video_input_names())
    for name in processor.video_input_names():
        torch.testing.assert_close(torch.as_tensor(half[name]), torch.as_tensor(once[name]), rtol=0, atol=0)


@pytest.mark.parametrize("family", SHARED_TOKEN_FAMILIES)
def test_a_video_token_shared_with_images_needs_its_token_types(
    family: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """Where videos expand into the image token, only mm_token_type_ids tell a video's tokens from an image's: the
    processor-output check names video.token when they are missing or mark no token as a video's."""
    from resonance.base.checks import video_output_problems

    mapper, processor = load_adapter(tiny_checkpoint(family))
    conversation = [{"role": "user", "content": [IMAGE, VIDEO, txt("?")]}, {"role": "assistant", "content": [txt("x")]}]
    image = tmp_path / "cat.png"
    Image.fromarray(np.full((30, 40, 3), 90, dtype=np.uint8)).save(image)
    videos = [video_ref(frames=write_frames(tmp_path, "a", 4))]
    row = {"messages": conversation, "images": [str(image)], "videos": videos, "source": "d:1"}
    batch = dict(mapper.sft_collator(processor)([row]))
    assert video_output_problems(processor, batch) == []
    images_only = {
        **batch,
        "mm_token_type_ids": torch.where(processor.video_token_mask(batch), 1, batch["mm_token_type_ids"]),
    }
    without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    for broken, why in [(without, "returns no mm_token_type_ids"), (images_only, "has the video mm_token_type_ids")]:
        [problem] = video_output_problems(processor, broken)
        assert problem.field == "video.token" and why in problem.message


def test_a_longer_frame_list_is_sampled_to_the_family_s_frame_count(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """Where the processor stacks a batch's videos (spec video.sampling.equal_frames), a list of more frames than
    num_frames reaches it as the frames the HF processor itself samples from that list (its video processor's
    sample_frames with the spec's num_frames, given the list and its metadata)."""
    family = next(name for name in VIDEO_FAMILIES if least_frames(name))
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    video = video_ref(frames=write_frames(tmp_path, "long", least_frames(family) + 5))
    conversation = [{"role": "user", "content": [VIDEO, txt("What?")]}, {"role": "assistant", "content": [txt("x")]}]
    row = {"messages": conversation, "images": [], "videos": [video], "source": "d.jsonl:1"}
    batch = mapper.sft_collator(processor)([row])

    hf = load_hf_processor(ckpt)
    reference = _hf_batch(hf, [_to_hf(conversation, [_reference_inputs(video, family)], [])], family, "file")
    unsampled = _hf_batch(hf, [_to_hf(conversation, [_reference_inputs(video, family)], [])], family, "frames")
    for key in reference:
        torch.testing.assert_close(torch.as_tensor(batch[key]), torch.as_tensor(reference[key]), rtol=0, atol=0)
    pixels = processor.video_input_names()[0]
    assert reference[pixels].shape != unsampled[pixels].shape  # the HF processor did sample the list
