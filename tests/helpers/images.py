"""Deterministic test images, the PNG files the data files and collators read, and a local HTTP server for
image URLs (tests never touch the network)."""

from __future__ import annotations

import http.server
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


def image_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    """``image`` encoded as a file of ``format``, in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@dataclass
class LocalServer:
    """A running :func:`serve_files` server: its base ``url``, the paths it was asked for in order, and the
    ``User-Agent`` of each request."""

    url: str
    hits: list[str] = field(default_factory=list)
    agents: list[str | None] = field(default_factory=list)


@contextmanager
def serve_files(
    files: dict[str, bytes], content_length: bool = True, hold: threading.Event | None = None
) -> Iterator[LocalServer]:
    """An HTTP server on 127.0.0.1 (a free port, in a thread) answering ``GET /NAME`` with ``files[NAME]``, 404
    for any other path. ``content_length=False``: no Content-Length header, the body ends when the connection
    closes (HTTP/1.0), as a streamed download does. ``hold``: answer only once it is set (a stalled server)."""
    server: LocalServer

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.hits.append(self.path)
            server.agents.append(self.headers.get("User-Agent"))
            if hold is not None:
                hold.wait()
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if content_length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server = LocalServer(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
