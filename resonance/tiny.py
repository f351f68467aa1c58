"""Tiny random-weight vision-language checkpoints, built fully offline from a declarative dict.

A family spec carries a ``tiny:`` section (see ``tests/fixtures/tiny/*.yaml``)::

    model_class: LlavaForConditionalGeneration       # getattr(transformers, name)
    config_class: LlavaConfig
    config: {...}                 # kwargs to config_class; nested text_config / vision_config dicts allowed
    processor_class: LlavaProcessor
    processor: {...}              # extra kwargs to processor_class (a video_processor is handled here)
    image_processor_class: CLIPImageProcessorPil
    image_processor: {...}        # constructor kwargs
    tokenizer:
      vocab_size: 400             # byte-level BPE trained with `tokenizers` on a built-in corpus
      special_tokens: ["<image>"] # added as special tokens, ids right after bos/eos/pad/unk
      bos_token: "<s>"            # optional, like eos_token / pad_token / unk_token
      add_bos_token: true         # optional: the tokenizer prepends bos (Llama style)
      config_token_ids:           # config paths (dotted) filled with token ids after the processor is built
        image_token_id: "<image>"
        text_config.pad_token_id: "<pad>"
    chat_template: "..."          # the family's real chat template (jinja)

``build_tiny`` trains the tokenizer, builds the image processor and the processor, fills the config's
token ids (and ``text_config.vocab_size = len(tokenizer)``) from the tokenizer as the processor left it,
builds the model with seeded random weights and saves both with ``save_pretrained``.

Without torchvision, processors that declare a ``video_processor`` (Qwen2-VL, SmolVLM...) cannot be
built, saved or loaded by transformers at all. ``build_tiny`` then builds them without one, and loading
such a folder needs the same allowance::

    with video_processor_optional():
        processor = AutoProcessor.from_pretrained(out_dir)
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.processing_utils import ProcessorMixin, _get_modality_for_attribute

from resonance.spec import ModelSpec
from resonance.utils.compat import video_processor_optional

__all__ = [
    "build_processor_and_config",
    "build_tiny",
    "build_tokenizer",
    "tiny_from_spec",
]

REQUIRED_KEYS = (
    "model_class",
    "config_class",
    "config",
    "processor_class",
    "image_processor_class",
    "tokenizer",
    "chat_template",
)
OPTIONAL_KEYS = ("processor", "image_processor")
TOKENIZER_KEYS = (
    "vocab_size",
    "special_tokens",
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "add_bos_token",
    "add_eos_token",
    "config_token_ids",
)
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")

# Small built-in English corpus; the chat template text is added to it, so role names and markers
# get merges of their own.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
What is shown in this image? The image shows a cat sitting on a red chair next to a window.
Describe the picture in detail. There is a dog and a person walking in the park on a sunny day.
How many people are in the photo? Two people are standing near the door of a small house.
What color is the car? The car is blue, and it is parked in front of a tall building.
Answer the question with a single word. Yes. No. Maybe. I do not know.
You are a helpful assistant. Please answer the user's question as well as you can.
The model reads the text and looks at the image, then it writes a short answer for the user.
Is there any text in the image? The sign says open from nine in the morning to five in the evening.
Where was this photo taken? It looks like a beach with white sand, blue water and a few boats.
Which answer is better? The first answer is correct and helpful; the second one is wrong.
Thank you! You are welcome. Let me know if you have another question about the picture.
USER: ASSISTANT: User: Assistant: system user assistant System: Picture 1: Video 1:
"""


def tiny_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """The dict :func:`build_tiny` takes, from a family spec's ``tiny`` section and class names."""
    return {"model_class": spec.model_class, "processor_class": spec.processor_class, **spec.tiny.model_dump()}


def build_tokenizer(spec: Mapping[str, Any], chat_template: str | None = None) -> transformers.TokenizersBackend:
    """Train a deterministic byte-level BPE tokenizer from a ``tokenizer`` dict and wrap it for transformers.

    Special tokens get the first ids, in the order: bos, eos, pad, unk, then ``special_tokens``.
    """
    unknown = set(spec) - set(TOKENIZER_KEYS)
    if unknown:
        raise ValueError(f"tokenizer: unknown keys {sorted(unknown)}; allowed: {list(TOKENIZER_KEYS)}")
    named = {key: spec[key] for key in NAMED_SPECIAL_TOKENS if spec.get(key)}
    specials: list[str] = []
    for token in [*named.values(), *spec.get("special_tokens", [])]:
        if token not in specials:
            specials.append(token)

    backend = Tokenizer(models.BPE(unk_token=named.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(spec.get("vocab_size", 400)),
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = CORPUS.splitlines()
    if chat_template:  # the template's quoted literals and plain text, without the jinja tags
        corpus += re.findall(r"'([^']*)'", chat_template)
        corpus += re.split(r"\{[%#{].*?[%#}]\}", chat_template, flags=re.DOTALL)
    backend.train_from_iterator(corpus, trainer=trainer)

    extra = [token for token in specials if token not in named.values()]
    tokenizer = transformers.TokenizersBackend(
        tokenizer_object=backend,
        bos_token=named.get("bos_token"),
        eos_token=named.get("eos_token"),
        pad_token=named.get("pad_token"),
        unk_token=named.get("unk_token"),
        extra_special_tokens=extra,
        add_bos_token=bool(spec.get("add_bos_token", False)),
        add_eos_token=bool(spec.get("add_eos_token", False)),
        model_max_length=4096,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _resolve(name: str) -> Any:
    try:
        return getattr(transformers, name)
    except AttributeError as exc:
        raise ValueError(f"transformers has no attribute {name!r}") from exc


def _set_path(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"config path {path!r}: {key!r} is not a mapping")
    node[leaf] = value


def _token_id(tokenizer: transformers.TokenizersBackend, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ValueError(f"token {token!r} is not a single token of the tiny tokenizer")
    return int(token_id)


def _build_processor(tiny: Mapping[str, Any], tokenizer: transformers.TokenizersBackend) -> ProcessorMixin:
    processor_class = _resolve(tiny["processor_class"])
    image_processor = _resolve(tiny["image_processor_class"])(**copy.deepcopy(tiny.get("image_processor") or {}))
    kwargs: dict[str, Any] = copy.deepcopy(tiny.get("processor") or {})
    attributes = processor_class.get_attributes()
    for name in attributes:
        modality = _get_modality_for_attribute(name)
        if modality == "video_processor" and name not in kwargs:
            # Only reached with torchvision installed (see video_processor_optional): default video
            # processor of the family, named like AutoVideoProcessor infers it from the image processor.
            video_class = tiny["image_processor_class"].removesuffix("Pil").replace("ImageProcessor", "VideoProcessor")
            kwargs[name] = _resolve(video_class)()
        elif modality not in ("image_processor", "tokenizer", "video_processor"):
            raise ValueError(f"{processor_class.__name__} needs a {name}, which build_tiny does not make")
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tiny["chat_template"], **kwargs
    )


def _build_config(tiny: Mapping[str, Any], tokenizer: transformers.TokenizersBackend) -> Any:
    config: dict[str, Any] = copy.deepcopy(dict(tiny["config"]))
    for path, token in (tiny["tokenizer"].get("config_token_ids") or {}).items():
        _set_path(config, path, _token_id(tokenizer, token))
    built = _resolve(tiny["config_class"])(**config)
    built.get_text_config(decoder=True).vocab_size = len(tokenizer)
    return built


def build_processor_and_config(tiny: Mapping[str, Any]) -> tuple[ProcessorMixin, Any]:
    """The processor and model config that ``tiny`` describes, without weights (benchmarks size them up)."""
    tokenizer = build_tokenizer(tiny["tokenizer"], tiny["chat_template"])
    processor = _build_processor(tiny, tokenizer)
    # The processor may add tokens (Idefics3): read every id from the tokenizer as it left it.
    tokenizer = processor.tokenizer
    tokenizer.chat_template = tiny["chat_template"]
    return processor, _build_config(tiny, tokenizer)


def _check_tiny(tiny: Mapping[str, Any]) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in tiny]
    unknown = set(tiny) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS)
    if missing or unknown:
        raise ValueError(f"tiny spec: missing keys {missing}, unknown keys {sorted(unknown)}")


def build_tiny(tiny: Mapping[str, Any], out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Build a tiny random model and its processor from ``tiny`` and save both into ``out_dir``.

    The folder loads back with ``AutoProcessor.from_pretrained`` and ``AutoModelForImageTextToText``
    (or the named model class). The same ``tiny`` and ``seed`` give byte-identical weights and tokenizer.
    The folder is written next to ``out_dir`` and renamed at the end, so a failure leaves nothing behind.
    Raises ``FileExistsError`` if ``out_dir`` exists and is not empty, unless ``overwrite``.
    """
    _check_tiny(tiny)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0o700
        with video_processor_optional():
            processor, config = build_processor_and_config(tiny)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = _resolve(tiny["model_class"])(config).to(torch.float32).eval()
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
        if out_dir.is_dir() and not out_dir.is_symlink():
            shutil.rmtree(out_dir)
        elif out_dir.exists():
            out_dir.unlink()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
