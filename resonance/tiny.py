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
      named_special_tokens:       # optional: model-specific special tokens the processor reads by name
        context_image_token: "<IMG_CONTEXT>"   # -> tokenizer.context_image_token(_id), like InternVL's
      bos_token: "<s>"            # optional, like eos_token / pad_token / unk_token
      add_bos_token: true         # optional: the tokenizer prepends bos (Llama style)
      pre_tokenizer_pattern: "..."  # optional: the family's split regex (default: GPT-2's), e.g. Llama 3's
      config_token_ids:           # config paths (dotted) filled with token ids after the processor is built
        image_token_id: "<image>"
        text_config.pad_token_id: "<pad>"
    chat_template: "..."          # the family's real chat template (jinja)
    extra_tokenizers:             # optional: a processor's other tokenizers, by processor attribute
      qformer_tokenizer:          # InstructBLIP's Q-Former tokenizer
        kind: wordpiece           # BERT-style lower-cased WordPiece ([CLS] text [SEP]); or bpe (keys as above)
        vocab_size: 200
        pad_token: "[PAD]"        # likewise unk_token, cls_token, sep_token, mask_token
        config_vocab_size: qformer_config.vocab_size    # config path set to len(that tokenizer)
        config_token_ids: {qformer_config.pad_token_id: "[PAD]"}
    parameters:                   # optional: parameters (glob over names) set to a constant after init
      "*.cross_attn_attn_gate": 0.5

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

import collections
import copy
import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES
from transformers.processing_utils import ProcessorMixin, _get_modality_for_attribute

from resonance.codegen.schema import ModelSpec
from resonance.patches.video_processor import video_processor_kwargs, video_processor_optional

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
OPTIONAL_KEYS = ("processor", "image_processor", "extra_tokenizers", "parameters")
TOKENIZER_KEYS = (
    "vocab_size",
    "special_tokens",
    "named_special_tokens",
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "add_bos_token",
    "add_eos_token",
    "config_token_ids",
    "pre_tokenizer_pattern",
)
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
WORDPIECE_SPECIAL_TOKENS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")

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

    Special tokens get the first ids, in the order: bos, eos, pad, unk, ``special_tokens``, then any
    ``named_special_tokens`` not listed before. ``named_special_tokens`` maps attribute names to tokens
    (a real tokenizer_config's model-specific special tokens, e.g. InternVL's ``context_image_token``):
    the tokenizer exposes each as ``tokenizer.<name>`` and ``tokenizer.<name>_id`` and saves them.
    """
    unknown = set(spec) - set(TOKENIZER_KEYS)
    if unknown:
        raise ValueError(f"tokenizer: unknown keys {sorted(unknown)}; allowed: {list(TOKENIZER_KEYS)}")
    named = {key: spec[key] for key in NAMED_SPECIAL_TOKENS if spec.get(key)}
    model_specific = dict(spec.get("named_special_tokens") or {})
    specials: list[str] = []
    for token in [*named.values(), *spec.get("special_tokens", []), *model_specific.values()]:
        if token not in specials:
            specials.append(token)

    backend = Tokenizer(models.BPE(unk_token=named.get("unk_token")))
    pattern = spec.get("pre_tokenizer_pattern")
    if pattern:  # the family's own split regex, then bytes (Llama 3's and Qwen2's tokenizer.json layout)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # GPT-2's split regex
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
        **({"model_specific_special_tokens": model_specific} if model_specific else {}),
        add_bos_token=bool(spec.get("add_bos_token", False)),
        add_eos_token=bool(spec.get("add_eos_token", False)),
        model_max_length=4096,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


WORDPIECE_KEYS = ("vocab_size", "lowercase", "special_tokens", *WORDPIECE_SPECIAL_TOKENS)
EXTRA_TOKENIZER_KEYS = ("kind", "config_vocab_size", "config_token_ids")


def build_wordpiece_tokenizer(spec: Mapping[str, Any]) -> transformers.TokenizersBackend:
    """A deterministic BERT-style WordPiece tokenizer (lower-cased, ``[CLS] text [SEP]``) from ``spec``.

    Special tokens get the first ids, in the order: pad, unk, cls, sep, mask, then ``special_tokens``; then
    every character of the built-in corpus, alone and as a ``##`` continuation, then its most frequent
    words (ties in alphabetical order) up to ``vocab_size``. (The ``tokenizers`` WordPiece trainer breaks
    ties between equally frequent merges differently from run to run.)
    """
    unknown = set(spec) - set(WORDPIECE_KEYS)
    if unknown:
        raise ValueError(f"wordpiece tokenizer: unknown keys {sorted(unknown)}; allowed: {list(WORDPIECE_KEYS)}")
    named = {key: spec[key] for key in WORDPIECE_SPECIAL_TOKENS if spec.get(key)}
    specials = list(dict.fromkeys([*named.values(), *spec.get("special_tokens", [])]))
    normalizer = normalizers.BertNormalizer(lowercase=bool(spec.get("lowercase", True)))
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = [
        word
        for line in CORPUS.splitlines()
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    ]
    chars = sorted({char for word in words for char in word})
    vocab = list(dict.fromkeys([*specials, *chars, *(f"##{char}" for char in chars)]))
    counts = collections.Counter(words)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= int(spec.get("vocab_size", 200)):
            break
        if word not in vocab:
            vocab.append(word)
    unk = named.get("unk_token", "[UNK]")
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token=unk))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece()
    cls, sep = named.get("cls_token"), named.get("sep_token")
    if cls and sep:
        ids = [(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=ids
        )
    extra = [token for token in specials if token not in named.values()]
    return transformers.TokenizersBackend(
        tokenizer_object=backend, extra_special_tokens=extra, model_max_length=512, **named
    )


def build_extra_tokenizer(spec: Mapping[str, Any]) -> transformers.TokenizersBackend:
    """A processor's second tokenizer (``tiny.extra_tokenizers`` entry): ``kind`` wordpiece or bpe.

    ``config_vocab_size`` and ``config_token_ids`` are read by the config builder, not here.
    """
    options = {key: value for key, value in spec.items() if key not in EXTRA_TOKENIZER_KEYS}
    kind = spec.get("kind", "wordpiece")
    if kind == "wordpiece":
        return build_wordpiece_tokenizer(options)
    if kind == "bpe":
        return build_tokenizer(options)
    raise ValueError(f"extra tokenizer kind {kind!r}: expected 'wordpiece' or 'bpe'")


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
    # The unk token itself is a valid target (Mistral-based families pad with <unk>); anything else that
    # maps to the unk id is unknown.
    unknown = token_id == tokenizer.unk_token_id and token != tokenizer.unk_token
    if token_id is None or unknown or tokenizer.convert_ids_to_tokens(token_id) != token:
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
            # processor of the family, as AutoVideoProcessor maps the config's model type.
            model_type = _resolve(tiny["config_class"]).model_type
            video_class = (VIDEO_PROCESSOR_MAPPING_NAMES.get(model_type) or {}).get("torchvision")
            if video_class is None:
                raise ValueError(f"{processor_class.__name__} needs a video processor; none is mapped for {model_type}")
            kwargs[name] = _resolve(video_class)()
        elif name in (tiny.get("extra_tokenizers") or {}):  # a second tokenizer (InstructBLIP's qformer_tokenizer)
            kwargs[name] = build_extra_tokenizer(tiny["extra_tokenizers"][name])
        elif name != "tokenizer" and modality == "tokenizer":
            raise ValueError(f"{processor_class.__name__} needs a {name}: describe it in tiny.extra_tokenizers")
        elif modality not in ("image_processor", "tokenizer", "video_processor"):
            raise ValueError(f"{processor_class.__name__} needs a {name}, which build_tiny does not make")
    kwargs.update(video_processor_kwargs(processor_class))  # without torchvision: SmolVLM's required one is None
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tiny["chat_template"], **kwargs
    )


def _build_config(
    tiny: Mapping[str, Any], tokenizer: transformers.TokenizersBackend, processor: ProcessorMixin | None = None
) -> Any:
    config: dict[str, Any] = copy.deepcopy(dict(tiny["config"]))
    for path, token in (tiny["tokenizer"].get("config_token_ids") or {}).items():
        _set_path(config, path, _token_id(tokenizer, token))
    for name, spec in (tiny.get("extra_tokenizers") or {}).items():
        extra = getattr(processor, name)
        for path, token in (spec.get("config_token_ids") or {}).items():
            _set_path(config, path, _token_id(extra, token))
        if spec.get("config_vocab_size"):
            _set_path(config, spec["config_vocab_size"], len(extra))
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
    return processor, _build_config(tiny, tokenizer, processor)


def set_parameters(model: torch.nn.Module, values: Mapping[str, float]) -> None:
    """Fill the parameters whose names match each glob pattern (``tiny.parameters``) with a constant.

    For weights a trained checkpoint has away from their initial value where that value cuts a path off
    (Mllama's tanh gates start at 0, which would hide the images from the text). A pattern matching no
    parameter is an error.
    """
    named = dict(model.named_parameters())
    with torch.no_grad():
        for pattern, value in values.items():
            matched = [name for name in named if fnmatch.fnmatchcase(name, pattern)]
            if not matched:
                raise ValueError(f"tiny.parameters: {pattern!r} matches no parameter of {type(model).__name__}")
            for name in matched:
                named[name].fill_(float(value))


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
            set_parameters(model, tiny.get("parameters") or {})
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
