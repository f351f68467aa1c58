"""Where a row's images come from (``resonance.data.images.resolve_image``): every kind of reference resolves to
the absolute path of an image file; embedded images land once in the content-addressed store; every bad
reference is one message naming what was given and what would be right."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import threading
from pathlib import Path

import datasets
import pytest
from helpers.images import image_bytes, make_image, open_rgb, save_png, serve_files
from PIL import Image

from resonance.data import images
from resonance.data.images import ImageRefError, ImageSources, image_problem, resolve_image
from resonance.errors import ConfigError

RED = make_image(6, 4, seed=1)
BLUE = make_image(5, 3, seed=2)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data file's folder holding ``red.png`` and ``sub/blue.png``."""
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    save_png(folder, "red.png", RED)
    save_png(folder / "sub", "blue.png", BLUE)
    return folder


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def stored(store: Path) -> list[str]:
    """Every entry of the store, temporary files included."""
    return sorted(os.listdir(store)) if store.exists() else []


def same_pixels(path: str, image: Image.Image) -> bool:
    return open_rgb(path).tobytes() == image.convert("RGB").tobytes()


def refused(ref: object, sources: ImageSources) -> str:
    with pytest.raises(ImageRefError) as excinfo:
        resolve_image(ref, sources)
    return str(excinfo.value)


# -- paths and file URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    ["sub/blue.png", "./sub/../sub/blue.png", "{data}/sub/blue.png", "file://{data}/sub/blue.png"],
    ids=["relative", "dotted", "absolute", "file-url"],
)
def test_paths_resolve_to_the_absolute_file(data_dir: Path, store: Path, ref: str) -> None:
    sources = ImageSources(data_dir, store=store)
    assert resolve_image(ref.format(data=data_dir), sources) == str(data_dir / "sub" / "blue.png")
    assert stored(store) == []  # a file is used where it is


def test_a_path_object_resolves_like_its_text(data_dir: Path) -> None:
    assert resolve_image(Path("sub/blue.png"), ImageSources(data_dir)) == str(data_dir / "sub" / "blue.png")


def test_home_is_expanded_in_paths_and_in_image_root(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(data_dir))
    assert resolve_image("~/red.png", ImageSources(None)) == str(data_dir / "red.png")
    assert resolve_image("sub/blue.png", ImageSources(None, image_root=Path("~"))) == str(data_dir / "sub/blue.png")


def test_file_urls_decode_escapes_and_take_localhost(data_dir: Path) -> None:
    save_png(data_dir, "a red.png", RED)
    sources = ImageSources(None)
    assert resolve_image(f"file://{data_dir}/a%20red.png", sources) == str(data_dir / "a red.png")
    assert resolve_image(f"FILE://localhost{data_dir}/red.png", sources) == str(data_dir / "red.png")


def test_a_file_url_on_another_host_is_refused(data_dir: Path) -> None:
    message = refused(f"file://server{data_dir}/red.png", ImageSources(data_dir))
    assert "names the host 'server'; a file:// URL must be local (file:///abs/path.png)" in message


def test_image_root_wins_over_the_data_file_folder(data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    save_png(root, "red.png", BLUE)
    assert resolve_image("red.png", ImageSources(data_dir, image_root=root)) == str(root / "red.png")
    assert resolve_image("red.png", ImageSources(None, image_root=root)) == str(root / "red.png")
    message = refused("sub/blue.png", ImageSources(data_dir, image_root=root))
    assert message == f"image file not found: {root}/sub/blue.png (relative to --image_root {root})"


def test_a_missing_file_names_the_path_and_the_folder_it_was_resolved_against(data_dir: Path) -> None:
    message = refused("missing.png", ImageSources(data_dir))
    assert message == f"image file not found: {data_dir}/missing.png (relative to the data file's folder {data_dir})"
    assert refused(f"{data_dir}/gone.png", ImageSources(data_dir)) == f"image file not found: {data_dir}/gone.png"


def test_check_files_false_resolves_without_looking_at_the_file(data_dir: Path) -> None:
    sources = ImageSources(data_dir)
    assert resolve_image("missing.png", sources, check_files=False) == str(data_dir / "missing.png")
    assert resolve_image({"path": "sub"}, sources, check_files=False) == str(data_dir / "sub")


def test_a_relative_path_without_a_folder_asks_for_image_root() -> None:
    message = refused("a.png", ImageSources(None))
    assert message.startswith("relative path 'a.png' with no data file folder to resolve it against; pass --image_root")


def test_a_folder_is_not_an_image_file(data_dir: Path) -> None:
    assert refused("sub", ImageSources(data_dir)).startswith(f"not a file: {data_dir}/sub (from 'sub')")


def test_a_path_the_system_cannot_look_up_is_named(data_dir: Path) -> None:
    name = "x" * 300 + ".png"
    message = refused(name, ImageSources(data_dir))
    assert message == f"cannot read {data_dir}/{name} (from {name!r}): File name too long"


def test_a_colon_without_slashes_is_a_path_not_a_url(data_dir: Path) -> None:
    save_png(data_dir, "a:b.png", RED)
    assert resolve_image("a:b.png", ImageSources(data_dir)) == str(data_dir / "a:b.png")


@pytest.mark.parametrize("ref", ["s3://bucket/a.png", "hf://datasets/x/a.png", "ftp://host/a.png"])
def test_other_url_schemes_are_refused(ref: str) -> None:
    message = refused(ref, ImageSources(None, allow_urls=True))
    assert message.startswith(f"{ref!r} is a {ref.split(':')[0]}:// URL, which is not read; images are a path")


# -- embedded images and the store ----------------------------------------------------------------------


def test_bytes_are_written_once_named_by_their_sha256_and_format(store: Path) -> None:
    png, jpeg = image_bytes(RED), image_bytes(RED, "JPEG")
    sources = ImageSources(None, store=store)
    path = resolve_image(png, sources)
    assert path == str(store / f"{hashlib.sha256(png).hexdigest()}.png")
    assert Path(path).read_bytes() == png
    assert resolve_image(jpeg, sources) == str(store / f"{hashlib.sha256(jpeg).hexdigest()}.jpg")
    assert resolve_image(bytearray(png), sources) == path
    assert len(stored(store)) == 2


def test_the_same_bytes_again_are_never_rewritten(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = ImageSources(None, store=store)
    path = resolve_image(image_bytes(RED), sources)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = os.stat(path)
    assert resolve_image(image_bytes(RED), sources) == path
    monkeypatch.setattr(images, "_STORED", {})  # as a new process finds the store
    assert resolve_image(image_bytes(RED), sources) == path
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, 1_000_000_000)
    assert stored(store) == [Path(path).name]


def test_a_picture_repeated_on_many_rows_is_opened_by_pil_once(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *args, **kwargs: opened.append(fp) or real_open(fp, *args, **kwargs))
    sources = ImageSources(None, store=store)
    png = image_bytes(BLUE)
    paths = {resolve_image({"bytes": png, "path": None}, sources) for _ in range(5)}
    assert len(paths) == 1 and len(opened) == 2  # the format, then verify() before the one write


def test_store_files_are_0644_and_no_temporary_file_is_left(store: Path) -> None:
    sources = ImageSources(None, store=store)
    paths = {resolve_image(image_bytes(make_image(3, 3, seed=i)), sources) for i in range(3)}
    assert stored(store) == sorted(Path(p).name for p in paths)
    assert {stat.S_IMODE(os.stat(p).st_mode) for p in paths} == {0o644}


def test_a_failed_write_leaves_nothing_and_names_the_store(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.os, "replace", fail)
    with pytest.raises(ConfigError, match=f"cannot write to the image store {store} .*No space left on device"):
        resolve_image(image_bytes(RED), ImageSources(None, store=store))
    assert stored(store) == []


@pytest.mark.parametrize(
    "ref, given",
    [
        (b"hello world, not a picture", "26 bytes (b'hello wo'...)"),
        ({"bytes": b"%PDF-1.4 not an image", "path": "x.png"}, "{'bytes': 21 bytes (b'%PDF-1.4'...), 'path': 'x.png'}"),
        ("data:image/png;base64," + base64.b64encode(b"GIF? no").decode(), "'data:image/png;base64,R0lGPyBubw=='"),
    ],
    ids=["bytes", "struct", "data-uri"],
)
def test_bytes_that_are_not_an_image_are_refused_and_never_written(store: Path, ref: object, given: str) -> None:
    message = refused(ref, ImageSources(None, store=store))
    assert message.startswith(f"{given} is not an image PIL can read (UnidentifiedImageError")
    assert stored(store) == []


def test_a_truncated_image_is_refused_and_never_written(store: Path) -> None:
    png = image_bytes(make_image(64, 64, seed=3))
    message = refused(png[: len(png) // 2], ImageSources(None, store=store))
    assert " is a broken PNG image (" in message
    assert stored(store) == []


def test_a_data_uri_is_decoded_into_the_store(store: Path) -> None:
    png = image_bytes(BLUE)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    path = resolve_image(uri, ImageSources(None, store=store))
    assert Path(path).read_bytes() == png and same_pixels(path, BLUE)


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("data:text/plain;base64,aGVsbG8=", "is a data URI of type text/plain; expected data:image/...;base64,..."),
        ("data:image/png;base64", "is not a valid data URI ("),
        ("data:image/png;base64,iVBORw0KGgo", "is not a valid data URI ("),  # bad padding
    ],
)
def test_a_data_uri_that_is_not_an_image_is_refused(store: Path, uri: str, expected: str) -> None:
    assert expected in refused(uri, ImageSources(None, store=store))


def test_a_long_reference_is_cut_in_the_message(store: Path) -> None:
    uri = "data:text/plain;base64," + "A" * 10_000
    message = refused(uri, ImageSources(None, store=store))
    assert len(message) < 200 and "AAAA...'" in message


def test_struct_bytes_win_over_its_path(data_dir: Path, store: Path) -> None:
    path = resolve_image({"bytes": image_bytes(BLUE), "path": "red.png"}, ImageSources(data_dir, store=store))
    assert Path(path).parent == store and same_pixels(path, BLUE)


def test_a_struct_without_bytes_resolves_its_path_like_a_string(data_dir: Path, store: Path) -> None:
    sources = ImageSources(data_dir, store=store)
    assert resolve_image({"bytes": None, "path": "red.png"}, sources) == str(data_dir / "red.png")
    assert resolve_image({"path": "sub/blue.png"}, sources) == str(data_dir / "sub" / "blue.png")
    assert refused({"bytes": None, "path": "nope.png"}, sources).startswith("image file not found:")
    assert refused({"bytes": None, "path": None}, sources) == (
        "{'bytes': None, 'path': None} holds no image: give its 'bytes' or its 'path'"
    )


def test_a_pil_image_in_memory_is_stored_losslessly(store: Path) -> None:
    sources = ImageSources(None, store=store)
    path = resolve_image(RED, sources)
    assert path.endswith(".png") and Path(path).parent == store and same_pixels(path, RED)
    assert resolve_image(RED.copy(), sources) == path


def test_a_pil_image_in_a_mode_png_cannot_hold_is_stored_as_rgb(store: Path) -> None:
    cmyk = RED.convert("CMYK")
    path = resolve_image(cmyk, ImageSources(None, store=store))
    assert open_rgb(path).tobytes() == cmyk.convert("RGB").tobytes()


def test_a_pil_image_opened_from_a_file_is_that_file(data_dir: Path, store: Path) -> None:
    with Image.open(data_dir / "red.png") as image:
        assert resolve_image(image, ImageSources(None, store=store)) == str(data_dir / "red.png")
    assert stored(store) == []


def test_datasets_image_feature_values_resolve_decoded_or_not(data_dir: Path, store: Path) -> None:
    """The values a dataset with an Image column hands out: structs (decode=False) and PIL images (decoded), from
    a path and from embedded bytes, all resolve to the same pixels."""
    features = datasets.Features({"image": datasets.Image()})
    rows = {"image": [str(data_dir / "red.png"), {"bytes": image_bytes(BLUE), "path": "blue.png"}]}
    dataset = datasets.Dataset.from_dict(rows, features=features)
    sources = ImageSources(data_dir, store=store)
    for decode in (True, False):
        values = dataset.cast_column("image", datasets.Image(decode=decode))["image"]
        paths = [resolve_image(value, sources) for value in values]
        assert paths[0] == str(data_dir / "red.png")
        assert Path(paths[1]).parent == store and same_pixels(paths[1], BLUE)


def test_the_default_store_is_in_datasets_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    path = resolve_image(image_bytes(RED), ImageSources(None))
    assert Path(path).parent == tmp_path / "hf-cache" / "resonance_images"


def test_the_pixel_budget_applies_to_a_resolved_embedded_image(store: Path) -> None:
    path = resolve_image(image_bytes(make_image(20, 10)), ImageSources(None, store=store))
    assert image_problem(path, max_pixels=199) == (
        f"image {path} is 20 x 10 = 200 pixels, over --max_image_pixels 199; shrink it, or raise "
        "--max_image_pixels (0: no limit)"
    )
    assert image_problem(path, max_pixels=200) is None


@pytest.mark.parametrize(
    "ref, given",
    [
        (7, "int 7"),
        ({"url": "a.png"}, "{'url': 'a.png'}"),
        ({}, "{}"),
        ("  ", "'  '"),
    ],
)
def test_what_is_not_an_image_reference_is_named(ref: object, given: str) -> None:
    message = refused(ref, ImageSources(None))
    assert given in message and "images are a path, a file:// URL, an http(s):// URL" in message


# -- http(s) URLs ---------------------------------------------------------------------------------------


def test_a_url_is_refused_without_the_flag_and_nothing_is_fetched(store: Path) -> None:
    with serve_files({"red.png": image_bytes(RED)}) as server:
        url = f"{server.url}/red.png"
        assert refused(url, ImageSources(None, store=store)) == (
            f"{url!r} is a URL; pass --allow_image_urls to download it, or give a local path"
        )
    assert server.hits == [] and stored(store) == []


def test_a_url_is_downloaded_once_into_the_store_with_the_flag(store: Path) -> None:
    png = image_bytes(RED)
    sources = ImageSources(None, allow_urls=True, store=store)
    with serve_files({"red.png": png}) as server:
        url = f"{server.url}/red.png"
        path = resolve_image(url, sources)
        assert resolve_image(url, sources) == path
    assert path == str(store / f"{hashlib.sha256(png).hexdigest()}.png")
    assert server.hits == ["/red.png"]
    assert server.agents == ["resonance (image download; --allow_image_urls)"]


def test_a_stalled_server_is_given_up_on_after_the_timeout(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "DOWNLOAD_TIMEOUT_S", 0.05)
    release = threading.Event()
    with serve_files({"red.png": image_bytes(RED)}, hold=release) as server:
        url = f"{server.url}/red.png"
        try:
            message = refused(url, ImageSources(None, allow_urls=True, store=store))
        finally:
            release.set()
    assert message.startswith(f"cannot download {url!r}: ") and "timed out" in message


@pytest.mark.parametrize(
    "name, expected",
    [
        ("missing.png", "cannot download {url!r}: HTTP 404 Not Found"),
        ("page.html", "the download of {url!r} is not an image PIL can read (UnidentifiedImageError"),
    ],
)
def test_a_failed_download_names_the_url_and_is_tried_once(store: Path, name: str, expected: str) -> None:
    sources = ImageSources(None, allow_urls=True, store=store)
    with serve_files({"page.html": b"<html>sign in first</html>"}) as server:
        url = f"{server.url}/{name}"
        assert refused(url, sources).startswith(expected.format(url=url))
        refused(url, sources)
    assert server.hits == [f"/{name}"] and stored(store) == []


def test_an_unreachable_host_names_the_url(store: Path) -> None:
    with serve_files({}) as server:
        url = f"{server.url}/red.png"
    assert refused(url, ImageSources(None, allow_urls=True, store=store)).startswith(f"cannot download {url!r}: ")


@pytest.mark.parametrize("content_length", [True, False], ids=["declared", "streamed"])
def test_a_download_over_the_cap_is_refused(store: Path, monkeypatch: pytest.MonkeyPatch, content_length: bool) -> None:
    png = image_bytes(make_image(32, 32, seed=4))
    monkeypatch.setattr(images, "MAX_DOWNLOAD_BYTES", len(png) - 1)
    sources = ImageSources(None, allow_urls=True, store=store)
    with serve_files({"big.png": png, "small.png": image_bytes(RED)}, content_length=content_length) as server:
        message = refused(f"{server.url}/big.png", sources)
        assert message == (
            f"cannot download '{server.url}/big.png': over the {len(png) - 1}-byte limit for one image; download "
            "it and give a local path"
        )
        assert same_pixels(resolve_image(f"{server.url}/small.png", sources), RED)
    assert len(stored(store)) == 1
