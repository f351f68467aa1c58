"""Images of a row: opening them, THE rule for how many one conversation may carry, and the pixel budget.

The count rule (:class:`ImageCount`) is checked where rows are read (every bad row named by ``FILE:LINE`` before
the model loads), where a batch is collated (a row that reached the collator some other way) and where the
processor is called directly: each of them asks this one class.

The pixel budget (``--max_image_pixels``, :func:`image_problem`) is checked where rows are read, from each file's
header, before any pixel is decoded: a small file can hold a huge image (a 12000 x 12000 single-colour PNG is
168 KB and decodes to 432 MB of RGB). It replaces PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``),
which would stop the header read before the row and the size could be named, and which the flag can lift
(``0``: no limit) for images a user means to train on.

Where a row's images come from (:func:`resolve_image`): a path (relative to the data file's folder, or to
``--image_root``), a ``file://`` URL, an ``http(s)://`` URL (only with ``--allow_image_urls``), a ``data:image/...``
URI, bytes, a ``{"bytes", "path"}`` struct as ``datasets``' Image feature stores it, or a PIL image. Canonical rows
hold paths, so an image that is not a file yet is written once into a content-addressed store
(:func:`default_image_store`), named by the sha256 of its bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mimetypes
import os
import re
import stat
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
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
    no_videos: str | None = None  # why a conversation may carry no video (None: it may)
    least_frames: int | None = None  # the frames each video needs (spec video.sampling.equal_frames), None: any
    videos_alone: bool = False  # a conversation with videos may hold no image (spec video.with_images: false)

    @classmethod
    def for_family(cls, family: Any, most: int | None = None, no_videos: str | None = None) -> ImageCount:
        """A family's limits (spec image.required, image.multi_image, video: a processor class or instance),
        narrowed to ``most`` images, and to no video with the reason ``no_videos``, where an algorithm takes fewer
        (GRPO through TRL)."""
        family_most = None if family.multi_image else 1
        if most is not None:
            family_most = most if family_most is None else min(most, family_most)
        video = getattr(family, "video", None)
        if video is None:
            owner = family if isinstance(family, type) else type(family)
            name = owner.__module__.rpartition(".")[2]  # a generated adapter's package is named after its spec
            no_videos = f"the model family {name!r} takes no video (its spec has no video: section)"
        least_frames = None if video is None else video.fixed_frames
        alone = video is not None and not video.with_images
        return cls(1 if family.images_required else 0, family_most, no_videos, least_frames, alone)

    def problem(self, count: int) -> str | None:
        """Why a conversation with ``count`` images cannot be taken, or None."""
        if count < self.least:
            return f"{count} image(s), but this model family needs at least {self.least} per conversation"
        if self.most is not None and count > self.most:
            return f"{count} images, but this model family takes at most {self.most} per conversation"
        return None

    def video_problem(self, count: int, images: int = 0) -> str | None:
        """Why a conversation with ``count`` videos (and ``images`` images) cannot be taken, or None."""
        if count and images and self.videos_alone:
            return (
                f"{images} image(s) and {count} video(s), but this model family's processor takes images or videos "
                "in one call, not both (spec video.with_images: false); split the row, or pass --skip_invalid_rows "
                "to skip (and count) such rows"
            )
        if not count or self.no_videos is None:
            return None
        return (
            f"{count} video(s), but {self.no_videos}; remove the video, or pass --skip_invalid_rows to skip (and "
            "count) such rows"
        )


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


# -- where a row's images come from ------------------------------------------------------------------------------

DOWNLOAD_TIMEOUT_S = 30.0  # per http(s) request (connect, and each read)
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # one downloaded image; far above any photo a VLM is trained on
_USER_AGENT = "resonance (image download; --allow_image_urls)"  # some hosts refuse urllib's own
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")  # a scheme and '//': 'a:b.png' stays a (relative) path
_MIME_TYPES = mimetypes.MimeTypes()  # Python's own table, not the machine's: the same file names everywhere
_SHOWN_CHARS = 80  # of a reference quoted in a message (data URIs run to megabytes)
_IMAGE_KINDS = (
    "images are a path, a file:// URL, an http(s):// URL (with --allow_image_urls), a data:image/...;base64,... "
    "URI, bytes, a {'bytes': ..., 'path': ...} struct (datasets' Image feature) or a PIL image"
)


class ImageRefError(ValueError):
    """An image reference that gives no usable image; the message names what was given and what would be right.
    Internal to the data package: the row reader turns it into a problem of the row."""


@dataclass(frozen=True)
class ImageSources:
    """What an image reference of one dataset resolves against.

    ``base_dir``: the data file's folder (None for a Hub dataset or a ``save_to_disk`` folder without one);
    ``image_root``: ``--image_root``, where relative paths resolve instead of ``base_dir``; ``allow_urls``:
    ``--allow_image_urls``, download http(s) URLs; ``store``: where embedded and downloaded images are written
    (None: :func:`default_image_store`).
    """

    base_dir: Path | None
    image_root: Path | None = None
    allow_urls: bool = False
    store: Path | None = None


def default_image_store() -> Path:
    """``resonance_images`` in datasets' own cache (``HF_DATASETS_CACHE``), where it already extracts archives."""
    import datasets.config  # here: datasets is slow to import, and only embedded images need it

    return Path(datasets.config.HF_DATASETS_CACHE) / "resonance_images"


def resolve_image(ref: Any, sources: ImageSources, *, check_files: bool = True) -> str:
    """The absolute path of the image file that ``ref`` gives, as canonical rows hold it.

    A path resolves against ``sources.image_root``, else ``sources.base_dir`` (``~`` expanded) and must be a file
    (``check_files=False``: not looked at, as ``check_images=False`` reads rows); bytes, data URIs, PIL images
    without a file and downloads are written once into the image store. Raises
    :class:`ImageRefError` naming what was given and what would be right. The pixel budget and ``verify()`` are
    :func:`image_problem`'s, on the returned path.
    """
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if isinstance(ref, str):
        return _resolve_text(ref, sources, check_files)
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return _store_image(bytes(ref), _shown(ref), _store_of(sources))
    if isinstance(ref, Image.Image):
        return _resolve_pil(ref, sources)
    if isinstance(ref, dict) and ref and set(ref) <= {"bytes", "path"}:
        return _resolve_struct(ref, sources, check_files)
    raise ImageRefError(f"{_shown(ref)} is not an image reference; {_IMAGE_KINDS}")


def _resolve_text(text: str, sources: ImageSources, check_files: bool) -> str:
    if not text.strip():
        raise ImageRefError(f"empty image reference {text!r}; {_IMAGE_KINDS}")
    if text[:5].lower() == "data:":
        return _resolve_data_uri(text, sources)
    if text[:5].lower() == "file:":
        return _resolve_path(_file_url_path(text), text, sources, check_files)
    url = _URL.match(text)
    if url is None:
        return _resolve_path(text, text, sources, check_files)
    if url.group(1).lower() not in ("http", "https"):
        raise ImageRefError(f"{_shown(text)} is a {url.group(1)}:// URL, which is not read; {_IMAGE_KINDS}")
    if not sources.allow_urls:
        raise ImageRefError(f"{_shown(text)} is a URL; pass --allow_image_urls to download it, or give a local path")
    return _download(text, _store_of(sources))


def _resolve_path(path: str, given: str, sources: ImageSources, check_files: bool, what: str = "image") -> str:
    """``path`` (from ``given``: itself or a file URL) as an absolute path; with ``check_files``, of a file
    (``what``: image or video, for messages)."""
    path = os.path.expanduser(path)
    relative = not os.path.isabs(path)
    if relative:
        root = sources.image_root if sources.image_root is not None else sources.base_dir
        if root is None:
            raise ImageRefError(
                f"relative path {given!r} with no data file folder to resolve it against; pass --image_root "
                "(the folder image paths are relative to) or give absolute paths"
            )
        path = os.path.join(os.path.expanduser(root), path)
    path = os.path.abspath(path)
    if not check_files:
        return path
    try:
        is_file = stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        where = ""
        if relative:
            where = (
                f" (relative to --image_root {sources.image_root})"
                if sources.image_root is not None
                else f" (relative to the data file's folder {sources.base_dir})"
            )
        raise ImageRefError(f"{what} file not found: {path}{where}") from None
    except OSError as exc:  # a folder on the way that may not be read, a name too long, ...
        raise ImageRefError(f"cannot read {path} (from {given!r}): {exc.strerror or exc}") from None
    if not is_file:
        raise ImageRefError(f"not a file: {path} (from {given!r}); give the path of an {what} file")
    return path


def _file_url_path(url: str) -> str:
    """The local path of a ``file:`` URL (percent-escapes decoded); a remote host is refused."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageRefError(
            f"{_shown(url)} names the host {parsed.netloc!r}; a file:// URL must be local (file:///abs/path.png)"
        )
    if not parsed.path:
        raise ImageRefError(f"{_shown(url)} has no path; a file:// URL looks like file:///abs/path.png")
    return urllib.request.url2pathname(parsed.path)


def _resolve_struct(struct: dict[str, Any], sources: ImageSources, check_files: bool) -> str:
    """``{"bytes": b, "path": p}`` as datasets' Image feature stores it: the bytes when present, else the path."""
    data, path = struct.get("bytes"), struct.get("path")
    if data is not None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageRefError(f"{_shown(struct)}: 'bytes' must be the image file's bytes, got {_shown(data)}")
        return _store_image(bytes(data), _shown(struct), _store_of(sources))
    if path is None:
        raise ImageRefError(f"{_shown(struct)} holds no image: give its 'bytes' or its 'path'")
    if not isinstance(path, (str, os.PathLike)):
        raise ImageRefError(f"{_shown(struct)}: 'path' must be a string, got {_shown(path)}")
    return _resolve_text(os.fspath(path), sources, check_files)


def _resolve_pil(image: Image.Image, sources: ImageSources) -> str:
    """A PIL image opened from a file that is still there is that file (datasets' rule, ``encode_pil_image``);
    any other is written to the store losslessly as PNG (RGB or RGBA where PNG cannot hold its mode)."""
    filename = getattr(image, "filename", "")
    if isinstance(filename, (str, os.PathLike)) and filename and os.path.isfile(filename):
        return os.path.abspath(filename)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")
    except (OSError, KeyError, ValueError):  # a mode PNG cannot hold (CMYK, YCbCr, F, ...)
        buffer = io.BytesIO()
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, format="PNG")
    return _store_image(buffer.getvalue(), _shown(image), _store_of(sources))


def _resolve_data_uri(uri: str, sources: ImageSources) -> str:
    """A ``data:image/...;base64,...`` URI (OpenAI's ``image_url``), decoded by urllib's own data: handler."""
    try:
        with urllib.request.urlopen(uri) as response:  # a data: URI only: http(s) goes through _download
            media_type, data = response.headers.get_content_type(), response.read()
    except (ValueError, OSError) as exc:  # no comma, bad base64 padding, ...
        message = f"{_shown(uri)} is not a valid data URI ({exc}); expected data:image/...;base64,..."
        raise ImageRefError(message) from None
    if not media_type.startswith("image/"):
        raise ImageRefError(f"{_shown(uri)} is a data URI of type {media_type}; expected data:image/...;base64,...")
    return _store_image(data, _shown(uri), _store_of(sources))


# Downloads of this process, by (url, store): the image's path, or why it could not be had. A URL repeated on many
# rows is fetched once, and a dead one costs one timeout, not one per row.
_DOWNLOADS: dict[tuple[str, Path], str | ImageRefError] = {}
_DOWNLOADS_LOCK = threading.Lock()


def _download(url: str, store: Path) -> str:
    with _DOWNLOADS_LOCK:
        known = _DOWNLOADS.get((url, store))
    if known is None:
        try:
            known = _store_image(_fetch(url), f"the download of {_shown(url)}", store)
        except ImageRefError as exc:
            known = exc
        with _DOWNLOADS_LOCK:
            _DOWNLOADS[(url, store)] = known
    if isinstance(known, ImageRefError):
        raise known
    return known


def _fetch(url: str) -> bytes:
    """The body at ``url``: at most :data:`MAX_DOWNLOAD_BYTES`, each wait at most :data:`DOWNLOAD_TIMEOUT_S`."""
    cap, shown = MAX_DOWNLOAD_BYTES, _shown(url)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length", "")
            over_cap = length.isdigit() and int(length) > cap  # said up front: nothing is read
            data = b"" if over_cap else response.read(cap + 1)
    except urllib.error.HTTPError as exc:
        raise ImageRefError(f"cannot download {shown}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ImageRefError(f"cannot download {shown}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # a timeout while reading, a reset connection, a malformed URL
        raise ImageRefError(f"cannot download {shown}: {type(exc).__name__}: {exc}") from None
    if over_cap or len(data) > cap:
        raise ImageRefError(
            f"cannot download {shown}: over the {cap}-byte limit for one image; download it and give a local path"
        )
    return data


def _store_of(sources: ImageSources) -> Path:
    return sources.store if sources.store is not None else default_image_store()


# Images this process found or wrote in a store, by (store, sha256): a picture repeated on many rows is checked by
# PIL once.
_STORED: dict[tuple[Path, str], str] = {}
_STORED_LOCK = threading.Lock()


def _store_image(data: bytes, given: str, store: Path) -> str:
    """``store``'s file for the image ``data`` (``given`` names it in messages): ``<sha256><suffix>``, the suffix
    of the format PIL detects; written once, atomically, and only when PIL can open and ``verify()`` the bytes."""
    digest = hashlib.sha256(data).hexdigest()
    key = (store, digest)
    with _STORED_LOCK:
        known = _STORED.get(key)
    if known is not None:
        return known
    try:
        with _budget_is_ours(), Image.open(io.BytesIO(data)) as image:
            image_format = image.format or ""
            mimetype = image.get_format_mimetype() or ""
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageRefError(f"{given} is not an image PIL can read ({type(exc).__name__}: {exc})") from None
    target = store / f"{digest}{_suffix(image_format, mimetype)}"
    if target.is_file():
        return _remember(key, target)
    try:
        with _budget_is_ours(), Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as exc:
        raise ImageRefError(f"{given} is a broken {image_format} image ({type(exc).__name__}: {exc})") from None
    _write_once(target, data)
    return _remember(key, target)


def _remember(key: tuple[Path, str], target: Path) -> str:
    with _STORED_LOCK:
        _STORED[key] = str(target)
    return str(target)


def _suffix(image_format: str, mimetype: str) -> str:
    """The usual file suffix of a PIL format: the MIME type's (``.png``, ``.jpg``), else PIL's first one."""
    suffix = _MIME_TYPES.guess_extension(mimetype) if mimetype else None
    if suffix is None:
        suffix = min((ext for ext, fmt in Image.registered_extensions().items() if fmt == image_format), default="")
    return suffix


def _write_once(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file in the same folder and a rename, mode 0644: a reader
    never sees a partial file, a failed write leaves nothing, and a concurrent writer of the same bytes is harmless."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.chmod(temp, 0o644)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the image store {target.parent} ({type(exc).__name__}: {exc}); make it writable, "
            "or move datasets' cache with HF_DATASETS_CACHE"
        ) from None


def _shown(ref: Any) -> str:
    """``ref`` as a message quotes it, short: long texts cut, bytes counted, a PIL image by mode and size."""
    if isinstance(ref, str):
        return repr(ref if len(ref) <= _SHOWN_CHARS else ref[:_SHOWN_CHARS] + "...")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return f"{len(ref)} bytes ({bytes(ref[:8])!r}...)"
    if isinstance(ref, Image.Image):
        return f"a PIL image ({ref.mode}, {ref.width} x {ref.height})"
    if isinstance(ref, dict):
        return "{" + ", ".join(f"{key!r}: {_shown(value)}" for key, value in ref.items()) + "}"
    return "None" if ref is None else f"{type(ref).__name__} {ref!r}"[:_SHOWN_CHARS]
