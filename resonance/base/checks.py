"""Checks of a spec against the real model and processor, naming the spec field that is wrong.

They run when an adapter is first used (``VLModel.from_pretrained`` checks the module paths and
LoRA targets; ``VLProcessor`` checks the image token at construction and the image outputs on the
first batch with images) and, all at once, in ``resonance verify SPEC``.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformers.utils.import_utils import BACKENDS_MAPPING

from resonance.errors import FieldProblem, MissingBackendError, SpecMismatchError


def spec_file(owner: type) -> str:
    """The spec a generated adapter class came from (``specs/<name>.yaml``, from the registry of its package: the
    packaged adapters' or a project's), for error messages."""
    package, _, name = owner.__module__.rpartition(".")
    try:
        specs = importlib.import_module(f"{package}.registry").SPECS if package else {}
    except (ImportError, AttributeError):  # a class made outside generated code
        specs = {}
    return specs.get(name, f"the spec of {owner.__qualname__}")


# transformers' backend names whose pip package is named otherwise
_PIP_NAMES = {
    "vision": "pillow",
    "sklearn": "scikit-learn",
    "cv2": "opencv-python",
    "speech": "torchaudio",
    "audio": "soundfile soxr",
    "levenshtein": "python-Levenshtein",
    "yt_dlp": "yt-dlp",
    "g2p_en": "g2p-en",
}
# transformers' own wording for a missing package outside its backend table (SmolVLM's processor and num2words)
_PACKAGE_REQUIRED = re.compile(r"[Pp]ackage `?([A-Za-z0-9_.-]+)`? is required")


def _backend_messages() -> list[tuple[re.Pattern[str], str]]:
    """Each backend's error, as transformers writes it (``{0} requires the Torchvision library but...``), as a
    pattern whose group is the class that needs it, with the pip package to install."""
    patterns = []
    for backend, (_, template) in BACKENDS_MAPPING.items():
        head = template.strip().split("\n")[0]
        head = re.escape(head.split("{ACCELERATE_MIN_VERSION}")[0]).replace(re.escape("{0}"), r"(\w+)", 1)
        patterns.append((re.compile(head), _PIP_NAMES.get(backend, backend)))
    return patterns


def missing_backend(exc: ImportError, needed_by: str) -> MissingBackendError | None:
    """The package a transformers ImportError says is missing, as a :class:`MissingBackendError` naming the class
    that needs it (``needed_by`` where the message names none), or None for an ImportError of another kind."""
    text = str(exc)
    for pattern, package in _backend_messages():
        if match := pattern.search(text):
            return MissingBackendError("", match.group(1), package)
    if match := _PACKAGE_REQUIRED.search(text):
        return MissingBackendError("", needed_by, match.group(1))
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return MissingBackendError("", needed_by, exc.name.split(".")[0])
    return None


@contextmanager
def backends_named(where: str, needed_by: str) -> Iterator[None]:
    """Turn a missing package, met while a spec's classes are built or loaded, into a :class:`MissingBackendError`
    naming ``where`` (the spec and field, or empty), the class and the package."""
    try:
        yield
    except ImportError as exc:
        problem = missing_backend(exc, needed_by)
        if problem is None:
            raise
        raise MissingBackendError(where, problem.class_name, problem.package) from exc


def raise_problems(owner: type, problems: list[FieldProblem]) -> None:
    if problems:
        raise SpecMismatchError(spec_file(owner), problems)


def _near(path: str, names: list[str]) -> str:
    depth = path.count(".") + 1
    candidates = [n for n in names if n.count(".") + 1 <= depth + 1]
    close = difflib.get_close_matches(path, candidates, n=1, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def lora_layer_names(model: nn.Module, language_model_path: str, kinds: tuple[type, ...]) -> set[str]:
    """Leaf names of the layers of ``kinds`` at least one level below the language model: the names a LoRA target
    can give (:meth:`~resonance.base.model.VLModel.lora_target_modules` anchors them there)."""
    prefix = language_model_path + "."
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name.startswith(prefix) and "." in name[len(prefix) :] and isinstance(module, kinds)
    }


def module_problems(vl_model: Any, model: nn.Module) -> list[FieldProblem]:
    """Module paths that do not exist and LoRA targets that match no linear layer of the language model, for
    the transformers model (unwrapped from PEFT and distributed wrappers)."""
    base = model
    names = [name for name, _ in base.named_modules() if name]
    problems = []
    paths = {
        "modules.language_model": vl_model.language_model_path,
        "modules.vision_tower": vl_model.vision_tower_path,
        "modules.projector": vl_model.projector_path,
    }
    for field, path in paths.items():
        if path is None:
            continue
        try:
            base.get_submodule(path)
        except AttributeError:
            problems.append(FieldProblem(field, f"{type(base).__name__} has no submodule {path!r}{_near(path, names)}"))
    if any(p.field == "modules.language_model" for p in problems):
        return problems
    leaves = lora_layer_names(base, vl_model.language_model_path, (nn.Linear,))
    for index, target in enumerate(vl_model.default_lora_target):
        if target not in leaves:
            problems.append(
                FieldProblem(
                    f"lora.targets.{index}",
                    f"{target!r} is no linear layer under {vl_model.language_model_path}; "
                    f"its linear layers are named {sorted(leaves)}",
                )
            )
    return problems


def token_problems(vl_processor: Any) -> list[FieldProblem]:
    """The spec's image token, video token and stop token (where given) must each be one token of the tokenizer."""
    tokenizer = vl_processor.tokenizer
    problems = []
    for field, token in (
        ("image.token", vl_processor.image_token),
        ("chat_template.stop_token", vl_processor.stop_token),
        ("video.token", vl_processor.video.token if vl_processor.video is not None else None),
    ):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
            added = sorted(str(t) for t in tokenizer.get_added_vocab())
            problems.append(
                FieldProblem(
                    field,
                    f"{token!r} is not a token of the tokenizer{_near(token, added)} (its added tokens: {added[:12]})",
                )
            )
    return problems


def image_output_problems(vl_processor: Any, batch: Any) -> list[FieldProblem]:
    """Image inputs the processor did not produce for a batch with images, and a missing image token."""
    items, token, token_id = vl_processor.image_inputs, vl_processor.image_token, vl_processor.image_token_id
    return _output_problems("image", items, token, token_id, batch)


def video_output_problems(vl_processor: Any, batch: Any) -> list[FieldProblem]:
    """Video inputs the processor did not produce for a batch with videos, and a missing video token."""
    items, token, token_id = vl_processor.video.inputs, vl_processor.video.token, vl_processor.video_token_id
    problems = _output_problems("video", items, token, token_id, batch)
    if vl_processor.video_tokens_need_types() and "input_ids" in batch:
        # Videos expand into the image token: only mm_token_type_ids tell a video's tokens from an image's.
        if "mm_token_type_ids" not in batch:
            why = "the processor returns no mm_token_type_ids to tell a video's tokens from an image's"
        elif not vl_processor.video_token_mask(batch).any():
            why = "no token of a batch with videos has the video mm_token_type_ids (2)"
        else:
            return problems
        problems.append(FieldProblem("video.token", f"{token!r} is image.token too, but {why}"))
    return problems


def _output_problems(section: str, items: Any, token: str, token_id: int, batch: Any) -> list[FieldProblem]:
    """The spec section's (``image`` or ``video``) inputs missing from a batch holding that media, and its token
    missing from the batch's input_ids."""
    produced = sorted(batch.keys())
    problems = [
        FieldProblem(
            f"{section}.inputs.{index}.name",
            f"the processor produced no {item.name!r} for a batch with {section}s; it produced {produced}",
        )
        for index, item in enumerate(items)
        if item.name not in batch
    ]
    if "input_ids" in batch and not (batch["input_ids"] == token_id).any():
        problems.append(
            FieldProblem(
                f"{section}.token",
                f"{token!r} does not occur in the processor's input_ids for a batch with {section}s; it must be the "
                f"token the processor expands each {section} into",
            )
        )
    return problems
