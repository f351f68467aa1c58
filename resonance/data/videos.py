"""Videos of a row: where they come from, checking them where rows are read, and decoding them for the collator.

A video is a file (mp4, webm, mkv, ...: decoded with PyAV through transformers' own ``load_video``) or a list of
frame images (LLaMA-Factory's and ms-swift's other spelling: frames already sampled, used as given). Canonical rows
hold each video as ``{"path": str | None, "frames": [str]}``: the file's absolute path, or the frames' (each resolved
like an image, :func:`resolve_image`). A video file's frames are chosen when it is decoded, by the family's own video
processor (``VLProcessor.frame_indices``: its ``sample_frames`` with the spec's fps or num_frames).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resonance.data.images import (
    _URL,
    ImageRefError,
    ImageSources,
    _file_url_path,
    _resolve_path,
    _shown,
    _store_of,
    _write_once,
    image_problem,
    image_size,
    resolve_image,
)
from resonance.errors import RowError

_VIDEO_KINDS = (
    "a video is the path of a video file (mp4, webm, ...), a file:// URL, a list of frame images (each an image "
    "reference), or a {'bytes': ..., 'path': ...} struct (datasets' Video feature)"
)


def video_ref(path: str | None = None, frames: list[str] | None = None) -> dict[str, Any]:
    """A canonical video: a file's absolute path, or its frames' (exactly one of the two)."""
    return {"path": path, "frames": list(frames or [])}


def video_parts(messages: list[dict[str, Any]]) -> int:
    """How many video parts a canonical conversation holds."""
    return sum(part["type"] == "video" for m in messages if not isinstance(m["content"], str) for part in m["content"])


def resolve_video(ref: Any, sources: ImageSources, *, check_files: bool = True) -> dict[str, Any]:
    """The canonical video ``ref`` gives; raises :class:`ImageRefError` naming what was given and what would be
    right (the row reader turns it into a problem of the row)."""
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if isinstance(ref, str):
        if not ref.strip():
            raise ImageRefError(f"empty video reference {ref!r}; {_VIDEO_KINDS}")
        if ref[:5].lower() == "file:":
            return video_ref(_resolve_path(_file_url_path(ref), ref, sources, check_files, what="video"))
        if _URL.match(ref) or ref[:5].lower() == "data:":
            raise ImageRefError(f"{_shown(ref)}: videos are read from local files only; {_VIDEO_KINDS}")
        return video_ref(_resolve_path(ref, ref, sources, check_files, what="video"))
    if isinstance(ref, list | tuple):
        if not ref:
            raise ImageRefError(f"an empty list of frames; {_VIDEO_KINDS}")
        return video_ref(frames=[resolve_image(frame, sources, check_files=check_files) for frame in ref])
    if isinstance(ref, dict) and ref and set(ref) <= {"bytes", "path"}:
        data, path = ref.get("bytes"), ref.get("path")
        if isinstance(data, bytes | bytearray | memoryview):
            suffix = Path(path).suffix if isinstance(path, str) and Path(path).suffix else ".mp4"
            target = _store_of(sources) / f"{hashlib.sha256(bytes(data)).hexdigest()}{suffix}"
            if not target.is_file():
                _write_once(target, bytes(data))
            return video_ref(str(target))
        if isinstance(path, str | os.PathLike):
            return resolve_video(os.fspath(path), sources, check_files=check_files)
        raise ImageRefError(f"{_shown(ref)} holds no video: give its 'bytes' or its 'path'")
    raise ImageRefError(f"{_shown(ref)} is not a video reference; {_VIDEO_KINDS}")


def video_problem(video: dict[str, Any], max_pixels: int, least_frames: int | None = None) -> str | None:
    """Why a canonical video cannot be a row's video, or None: a file PyAV cannot open, without a video stream or
    without a frame count in its header; a frame that is no image (:func:`image_problem`), or frames of several
    sizes; fewer than :data:`MIN_FRAMES` frames, or than ``least_frames`` (the family's fixed frame count, spec
    video.sampling.equal_frames). Only headers are read, never the pixels."""
    if video["path"] is None:
        sizes = set()
        for frame in video["frames"]:
            if (problem := image_problem(frame, max_pixels)) is not None:
                return problem
            sizes.add(image_size(frame))
        if len(sizes) > 1:
            return f"the frames of a video must have one size; got {sorted(sizes)} in {video['frames']}"
        return _too_short(len(video["frames"]), "a list of", least_frames)
    import av

    path = video["path"]
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return f"{path} holds no video stream"
            frames = container.streams.video[0].frames
            if not frames:
                return f"{path} gives no frame count in its header (PyAV reads 0); re-encode it as mp4"
            if (problem := _too_short(frames, f"{path}:", least_frames)) is not None:
                return problem
    except Exception as exc:  # PyAV raises many types (InvalidDataError, FileNotFoundError, ...)
        return f"cannot be opened as a video: {path} ({type(exc).__name__}: {exc})"
    return None


MIN_FRAMES = 2  # every video processor here groups frames in pairs (temporal patches of 2)


def _too_short(frames: int, what: str, least_frames: int | None = None) -> str | None:
    if least_frames is not None and least_frames > MIN_FRAMES and frames < least_frames:
        return (
            f"{what} {frames} frame(s); this model family's processor stacks a batch's videos, each of exactly "
            f"{least_frames} frames (spec video.sampling.num_frames with equal_frames), so a video needs at least "
            f"{least_frames}"
        )
    if frames >= MIN_FRAMES:
        return None
    return (
        f"{what} {frames} frame(s); a video needs at least {MIN_FRAMES} (a single frame is an image: give it in "
        "'images')"
    )


def _repeated_as_sampled(frames: Any, indices: Any) -> Any:
    """The decoded ``frames`` in the order and number of the sampled ``indices``: transformers' PyAV reader decodes
    each frame once, in file order, where a sampler may name one twice (GLM-4.1V's repeats the last frame to make
    an odd count even), as a sampler applied to the whole decoded video gives it."""
    import numpy as np

    indices = np.asarray(indices)
    unique = np.unique(indices)
    if len(unique) == len(indices) or len(frames) != len(unique):
        return frames
    return frames[np.searchsorted(unique, indices)]


@dataclass(frozen=True)
class LoadedVideo:
    """A decoded video: its frames as an array (frames, height, width, 3) of RGB bytes, transformers'
    ``VideoMetadata`` (the source's fps and which frames were taken: the timestamps some processors derive), and
    whether it was given as frame images."""

    frames: Any
    metadata: Any
    given_as_frames: bool = False


def load_row_videos(processor: Any, videos: list[dict[str, Any]], source: str) -> list[LoadedVideo]:
    """A row's videos, decoded: a file with PyAV (transformers' ``load_video``) at the frames the family's video
    processor samples (``processor.frame_indices``), frames as given (taken at the spec's video.sampling.frames_fps).
    An unreadable file is a :class:`RowError` naming the row's ``source`` (FILE:LINE)."""
    if not videos:
        return []
    import numpy as np
    from PIL import Image
    from transformers.video_utils import VideoMetadata, load_video

    least = None if processor.video is None else processor.video.fixed_frames
    loaded = []
    for video in videos:
        if video["path"] is not None:
            path = video["path"]

            def sample(metadata: Any, path: str = path, **kwargs: Any) -> Any:
                if (problem := _too_short(metadata.total_num_frames, f"video {path}:", least)) is not None:
                    raise RowError(f"{source}: {problem}")
                return processor.frame_indices(metadata, **kwargs)

            try:
                frames, metadata = load_video(path, backend="pyav", sample_indices_fn=sample)
            except RowError:
                raise
            except Exception as exc:  # PyAV, numpy and the sampler raise many types
                raise RowError(f"{source}: cannot read video {path}: {type(exc).__name__}: {exc}") from exc
            frames = _repeated_as_sampled(frames, metadata.frames_indices)
            if (problem := _too_short(len(frames), f"video {path}: the frames sampled are")) is not None:
                raise RowError(f"{source}: {problem}")
            loaded.append(LoadedVideo(frames, metadata))
            continue
        try:
            images = []
            for path in video["frames"]:
                with Image.open(path) as image:
                    images.append(np.asarray(image.convert("RGB")))
            frames = np.stack(images)
        except (OSError, ValueError) as exc:
            raise RowError(f"{source}: cannot read the frames of a video ({video['frames']}): {exc}") from exc
        if (problem := _too_short(len(frames), "a video of", least)) is not None:
            raise RowError(f"{source}: {problem}")
        fps = processor.video.frames_fps
        count, height, width = frames.shape[:3]
        metadata = VideoMetadata(count, fps, width, height, count / fps, None, list(range(count)))
        if least is not None and count > least:  # sampled down to the family's frame count, as a file is
            indices = [int(i) for i in processor.frame_indices(metadata)]
            frames, metadata.frames_indices = frames[indices], indices
        loaded.append(LoadedVideo(frames, metadata, given_as_frames=True))
    return loaded
