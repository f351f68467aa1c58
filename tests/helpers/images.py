"""Deterministic test images, and the PNG files the data files and collators read."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image of ``width`` x ``height``; different seeds give different pixels."""
    pixels = bytes(
        (x * (7 + seed) + y * (3 + 2 * seed) + c * 50 + 31 * seed) % 256
        for y in range(height)
        for x in range(width)
        for c in range(3)
    )
    return Image.frombytes("RGB", (width, height), pixels)


def save_png(folder: Path, name: str, image: Image.Image) -> str:
    """Save ``image`` losslessly as ``folder/name`` and return the absolute path."""
    path = folder / name
    image.save(path, format="PNG")
    return str(path.resolve())


def open_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def row_images(folder: Path, row: int, sizes: list[tuple[int, int]]) -> list[str]:
    """Save a row's images (of these (width, height) sizes) as ``row{row}_img{j}.png`` in ``folder``; absolute
    paths."""
    return [
        save_png(folder, f"row{row}_img{j}.png", make_image(w, h, seed=10 * row + j)) for j, (w, h) in enumerate(sizes)
    ]
