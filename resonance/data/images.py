"""Images of a row: opening them, and THE rule for how many one conversation may carry.

The rule (:class:`ImageCount`) is checked where rows are read (every bad row named by ``FILE:LINE`` before the
model loads), where a batch is collated (a row that reached the collator some other way) and where the
processor is called directly: each of them asks this one class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from resonance.errors import RowError


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


def load_row_images(processor: Any, paths: list[str], source: str) -> list[Image.Image]:
    """A row's images as RGB. An unreadable file, or an image count the family cannot take, is a
    :class:`RowError` naming the row's ``source`` (FILE:LINE)."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise RowError(f"{source}: cannot read image {path}: {exc}") from exc
    problem = ImageCount.for_family(processor).problem(len(images))
    if problem is not None:
        raise RowError(f"{source}: {problem}")
    return images
