"""Short synthetic clips for the video tests, written into a test's folder: an mp4 through PyAV and the same
kind of clip as a list of PNG frames. Frames are seeded random noise with a moving bright square, so every frame
differs (a sampler that picks the wrong frames changes the pixels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from helpers.repo import FAMILIES, read_spec


def clip_frames(count: int = 8, size: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    """``count`` RGB frames (count, height, width, 3) of ``size`` (width, height)."""
    width, height = size
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 200, (count, height, width, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        x = (index * 3) % max(width - 8, 1)
        frame[4:12, x : x + 8] = 255
    return frames


def write_clip(folder: Path, name: str, count: int = 8, fps: int = 4, size: tuple[int, int] = (32, 32)) -> str:
    """An mp4 (mpeg4) of ``count`` frames at ``fps`` into ``folder``; its path."""
    import av

    path = folder / name
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for frame in clip_frames(count, size):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_frames(folder: Path, name: str, count: int = 4, size: tuple[int, int] = (32, 32)) -> list[str]:
    """``count`` PNG frames in ``folder/name/``; their paths, in order."""
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(clip_frames(count, size, seed=1)):
        path = target / f"{index:03d}.png"
        Image.fromarray(frame).save(path)
        paths.append(str(path))
    return paths


# The families whose spec has a video: section, and one without (which refuses video rows by name).
VIDEO_FAMILIES = [name for name in FAMILIES if read_spec(name).get("video")]
NO_VIDEO_FAMILY = next(name for name in FAMILIES if not read_spec(name).get("video"))


def least_frames(family: str) -> int:
    """The frames each video of ``family`` needs: its fixed count (spec video.sampling.num_frames with
    equal_frames: the processor stacks a batch's videos), else 0 (any count a video processor takes)."""
    sampling = read_spec(family)["video"].get("sampling") or {}
    return sampling["num_frames"] if sampling.get("equal_frames") else 0


def own_video_inputs(family: str) -> list[str]:
    """The video inputs of ``family`` that are no image input (Qwen's pixel_values_videos and video_grid_thw); the
    others hold the videos' frames among the images' (InternVL's pixel_values)."""
    spec = read_spec(family)
    images = {item["name"] for item in spec["image"]["inputs"]}
    return [item["name"] for item in spec["video"]["inputs"] if item["name"] not in images]


def video_pixels(family: str) -> str | None:
    """The input holding ``family``'s own video pixels (not its grid), or None where the frames join the images'."""
    grid = read_spec(family)["video"].get("grid_input")
    return next((name for name in own_video_inputs(family) if name != grid), None)


# One family whose videos have inputs of their own, for the tests that look at them
OWN_VIDEO_FAMILY = next(name for name in VIDEO_FAMILIES if video_pixels(name))
# The families whose videos expand into their image token yet have inputs of their own (GLM-4.1V): their
# mm_token_type_ids tell a video's tokens from an image's. (InternVL's frames join the images' inputs: its video
# tokens are image tokens to the model too.)
SHARED_TOKEN_FAMILIES = [
    name
    for name in VIDEO_FAMILIES
    if read_spec(name)["video"]["token"] == read_spec(name)["image"]["token"] and video_pixels(name)
]
