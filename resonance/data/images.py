"""Images of a row: opening them, THE rule for how many one conversation may carry, and the pixel budget.

The count rule (:class:`ImageCount`) is checked where rows are read (every bad row named by ``FILE:LINE`` before
the model loads), where a batch is collated (a row that reached the collator some other way) and where the
processor is called directly: each of them asks this one class.

The pixel budget (``--max_image_pixels``, :func:`image_problem`) is checked where rows are read, from each file's
header, before any pixel is decoded: a small file can hold a huge image (a 12000 x 12000 single-colour PNG is
168 KB and decodes to 432 MB of RGB). It replaces PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``),
which would stop the header read before the row and the size could be named, and which the flag can lift
(``0``: no limit) for images a user means to train on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from resonance.errors import ConfigError, RowError

# 40 megapixels: above a 7680 x 4320 (8K) frame, far above what any supported processor feeds its model; PIL's own
# default limit is 89 megapixels.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class ImageCount:
    """How many images one conversation may carry: at least ``least``, at most ``most`` (None: any number)."""

    least: int = 0
    most: int | None = None

    @classmethod
    def for_family(cls, family: Any, most: int | None = None) -> ImageCount:
        """A family's limits (spec image.required, image.multi_image: a processor class or instance), narrowed to
        ``most`` where an algorithm takes fewer (GRPO through TRL)."""
        family_most = None if family.multi_image else 1
        if most is not None:
            family_most = most if family_most is None else min(most, family_most)
        return cls(1 if family.images_required else 0, family_most)

    def problem(self, count: int) -> str | None:
        """Why a conversation with ``count`` images cannot be taken, or None."""
        if count < self.least:
            return f"{count} image(s), but this model family needs at least {self.least} per conversation"
        if self.most is not None and count > self.most:
            return f"{count} images, but this model family takes at most {self.most} per conversation"
        return None


ANY_IMAGE_COUNT = ImageCount()  # rows read with no family in mind


def check_pixel_budget(max_pixels: int) -> None:
    """Refuse a ``--max_image_pixels`` that is not a whole number >= 0."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise ConfigError(f"--max_image_pixels must be a whole number of pixels >= 0 (0: no limit), got {max_pixels!r}")


_PIL_LIMIT = threading.RLock()  # held while PIL's process-wide limit is switched off


@contextmanager
def _budget_is_ours() -> Iterator[None]:
    """PIL's decompression-bomb check off while an image is opened: the budget is checked here, by row. PIL's
    limit is one global; the lock keeps two threads from restoring each other's value (which could leave it off)."""
    with _PIL_LIMIT:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` from the file's header; no pixel is decoded."""
    with _budget_is_ours(), Image.open(path) as image:
        return image.size


def image_problem(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """Why the file at ``path`` cannot be a row's image, or ``None``: missing, not an image PIL can open and
    ``verify()``, or more than ``max_pixels`` pixels (0: no limit). Only the header and the file's structure are
    read, never the pixels."""
    try:
        with _budget_is_ours(), Image.open(path) as image:
            width, height = image.size
            if max_pixels and width * height > max_pixels:
                return (
                    f"image {path} is {width} x {height} = {width * height} pixels, over --max_image_pixels "
                    f"{max_pixels}; shrink it, or raise --max_image_pixels (0: no limit)"
                )
            image.verify()
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"cannot be opened as an image: {path} ({type(exc).__name__}: {exc})"
    return None


def load_row_images(processor: Any, paths: list[str], source: str) -> list[Image.Image]:
    """A row's images as RGB. An unreadable file, or an image count the family cannot take, is a
    :class:`RowError` naming the row's ``source`` (FILE:LINE). The pixel budget was checked where the row was
    read (:func:`image_problem`)."""
    images = []
    for path in paths:
        try:
            with _budget_is_ours(), Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise RowError(f"{source}: cannot read image {path}: {exc}") from exc
    problem = ImageCount.for_family(processor).problem(len(images))
    if problem is not None:
        raise RowError(f"{source}: {problem}")
    return images
