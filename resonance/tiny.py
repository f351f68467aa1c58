"""Tiny random-weight vision-language checkpoints, built fully offline from a family spec's ``tiny:`` section.

The section's fields are typed and documented in :class:`resonance.codegen.schema.Tiny` (``resonance schema``
prints them), and validated with the rest of the spec, every problem at its ``FILE:LINE:COL``. In short::

    config_class: LlavaConfig
    config: {...}                 # kwargs to config_class; nested text_config / vision_config mappings allowed
    processor: {...}              # extra kwargs to the spec's processor_class (a video_processor is made here)
    image_processor_class: CLIPImageProcessorPil
    image_processor: {...}        # constructor kwargs
    video_processor: {...}        # kwargs to the family's default video processor (small frames for video tests)
    tokenizer:
      vocab_size: 400             # byte-level BPE trained with `tokenizers` on a built-in corpus
      special_tokens: ["<image>"] # added as special tokens, ids right after bos/eos/pad/unk
      named_special_tokens:       # model-specific special tokens the processor reads by name
        context_image_token: "<IMG_CONTEXT>"   # -> tokenizer.context_image_token(_id), like InternVL's
      bos_token: "<s>"            # likewise eos_token / pad_token / unk_token
      add_bos_token: true         # the tokenizer prepends bos (Llama style)
      pre_tokenizer_pattern: "..."  # the family's split regex (default: GPT-2's), e.g. Llama 3's
      config_token_ids:           # config paths (dotted) filled with token ids after the processor is built
        image_token_id: "<image>"
        text_config.pad_token_id: "<pad>"
        eos_token_id: ["<eos>", "<|user|>"]   # a list of tokens: the list of their ids
    chat_template: "..."          # the family's real chat template (jinja)
    extra_tokenizers:             # a processor's other tokenizers, by processor attribute
      qformer_tokenizer:          # InstructBLIP's Q-Former tokenizer
        kind: wordpiece           # BERT-style lower-cased WordPiece ([CLS] text [SEP]); or bpe (keys as above)
        vocab_size: 200
        pad_token: "[PAD]"        # likewise unk_token, cls_token, sep_token, mask_token
        config_vocab_size: qformer_config.vocab_size    # config path set to len(that tokenizer)
        config_token_ids: {qformer_config.pad_token_id: "[PAD]"}
    derived:                      # config paths set from tokenizer.length or another config path
      vocab_size: tokenizer.length
      vision_config.out_hidden_size: text_config.hidden_size
    parameters:                   # parameters (glob over names) set to a constant after init
      "*.cross_attn_attn_gate": 0.5

``build_tiny`` trains the tokenizer, builds the image processor and the processor, fills the config's
token ids (and ``text_config.vocab_size = len(tokenizer)``) from the tokenizer as the processor left it,
builds the model with seeded random weights and saves both with ``save_pretrained``. What the schema
cannot know without transformers is checked here: class names, tokens that must be single tokens of the
trained tokenizer, config paths through the config's mappings, parameter patterns that must match.

Processors that declare a ``video_processor`` (Qwen2-VL, SmolVLM...) get their family's default one, the
class ``AutoVideoProcessor`` maps the config's model type to (torchvision's, a dependency of Resonance), built with
``tiny.video_processor``; likewise
a ``feature_extractor`` (Gemma 4's audio one), the class ``AutoFeatureExtractor`` maps it to.
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
from pydantic import Field
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES
from transformers.processing_utils import ProcessorMixin, _get_modality_for_attribute
from transformers.utils import is_torchvision_available

from resonance.base.checks import backends_named
from resonance.codegen.schema import (
    BpeExtraTokenizer,
    Identifier,
    ModelSpec,
    Tiny,
    TinyTokenizer,
    WordpieceTokenizer,
)
from resonance.errors import MissingBackendError

__all__ = [
    "TinyRecipe",
    "build_processor_and_config",
    "build_tiny",
    "build_tokenizer",
    "tiny_from_spec",
]

# The tokenizers' special tokens by name, in the order of their ids.
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


class TinyRecipe(Tiny):
    """What :func:`build_tiny` builds: a spec's ``tiny`` section and the model and processor classes it names."""

    model_class: Identifier = Field(description="The transformers model class, e.g. LlavaForConditionalGeneration.")
    processor_class: Identifier = Field(description="The transformers processor class, e.g. LlavaProcessor.")


def tiny_from_spec(spec: ModelSpec) -> TinyRecipe:
    """The recipe :func:`build_tiny` takes, from a family spec's ``tiny`` section and class names."""
    return TinyRecipe(model_class=spec.model_class, processor_class=spec.processor_class, **dict(spec.tiny))


def build_tokenizer(spec: TinyTokenizer, chat_template: str | None = None) -> transformers.TokenizersBackend:
    """Train a deterministic byte-level BPE tokenizer from a ``tiny.tokenizer`` section and wrap it for transformers.

    Special tokens get the first ids, in the order: bos, eos, pad, unk, ``special_tokens``, then any
    ``named_special_tokens`` not listed before. ``named_special_tokens`` maps attribute names to tokens
    (a real tokenizer_config's model-specific special tokens, e.g. InternVL's ``context_image_token``):
    the tokenizer exposes each as ``tokenizer.<name>`` and ``tokenizer.<name>_id`` and saves them.
    """
    named = {key: getattr(spec, key) for key in NAMED_SPECIAL_TOKENS if getattr(spec, key)}
    model_specific = dict(spec.named_special_tokens)
    specials: list[str] = []
    for token in [*named.values(), *spec.special_tokens, *model_specific.values()]:
        if token not in specials:
            specials.append(token)

    backend = Tokenizer(models.BPE(unk_token=named.get("unk_token")))
    pattern = spec.pre_tokenizer_pattern
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
        vocab_size=spec.vocab_size,
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
        add_bos_token=spec.add_bos_token,
        add_eos_token=spec.add_eos_token,
        model_max_length=4096,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_wordpiece_tokenizer(spec: WordpieceTokenizer) -> transformers.TokenizersBackend:
    """A deterministic BERT-style WordPiece tokenizer (lower-cased, ``[CLS] text [SEP]``) from ``spec``.

    Special tokens get the first ids, in the order: pad, unk, cls, sep, mask, then ``special_tokens``; then
    every character of the built-in corpus, alone and as a ``##`` continuation, then its most frequent
    words (ties in alphabetical order) up to ``vocab_size``. (The ``tokenizers`` WordPiece trainer breaks
    ties between equally frequent merges differently from run to run.)
    """
    named = {key: getattr(spec, key) for key in WORDPIECE_SPECIAL_TOKENS if getattr(spec, key)}
    specials = list(dict.fromkeys([*named.values(), *spec.special_tokens]))
    normalizer = normalizers.BertNormalizer(lowercase=spec.lowercase)
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
        if len(vocab) >= spec.vocab_size:
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


def build_extra_tokenizer(spec: WordpieceTokenizer | BpeExtraTokenizer) -> transformers.TokenizersBackend:
    """A processor's second tokenizer (a ``tiny.extra_tokenizers`` entry), by its ``kind``.

    ``config_vocab_size`` and ``config_token_ids`` are read by the config builder, not here.
    """
    if isinstance(spec, WordpieceTokenizer):
        return build_wordpiece_tokenizer(spec)
    return build_tokenizer(spec)


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


def _build_processor(tiny: TinyRecipe, tokenizer: transformers.TokenizersBackend) -> ProcessorMixin:
    """The spec's processor around ``tokenizer``; a part that needs a package not installed here (transformers'
    torchvision image and video processors, SmolVLM's num2words) is a MissingBackendError naming it."""
    with backends_named("", tiny.processor_class):
        return _processor_parts(tiny, tokenizer)


# Processor parts made with the family's defaults, the class each Auto class maps the config's model type to: a
# video processor (Qwen2-VL, SmolVLM...; torchvision's, a dependency of Resonance) and Gemma 4's audio feature
# extractor, which its processor takes for every checkpoint, image-only ones included.
_DEFAULT_PARTS = {
    "video_processor": lambda model_type: (VIDEO_PROCESSOR_MAPPING_NAMES.get(model_type) or {}).get("torchvision"),
    "feature_extractor": FEATURE_EXTRACTOR_MAPPING_NAMES.get,
}


def _default_part(tiny: TinyRecipe, processor_name: str, modality: str) -> Any:
    model_type = _resolve(tiny.config_class).model_type
    # The config's model type first, then the model types whose processor is the same class: a variant that
    # shares its processor may map no part of its own (glm4v_moe maps no video processor; glm4v, whose
    # Glm4vProcessor GLM-4.5V uses, does)
    sharing = sorted(t for t, p in PROCESSOR_MAPPING_NAMES.items() if p == processor_name and t != model_type)
    part_class = next((c for t in [model_type, *sharing] if (c := _DEFAULT_PARTS[modality](t))), None)
    if part_class is None and modality == "video_processor" and not is_torchvision_available():
        raise MissingBackendError("", f"{processor_name}'s video processor", "torchvision")
    if part_class is None:
        raise ValueError(f"{processor_name} needs a {modality.replace('_', ' ')}; none is mapped for {model_type}")
    return _resolve(part_class)(**(copy.deepcopy(tiny.video_processor) if modality == "video_processor" else {}))


def _processor_parts(tiny: TinyRecipe, tokenizer: transformers.TokenizersBackend) -> ProcessorMixin:
    processor_class = _resolve(tiny.processor_class)
    image_processor = _resolve(tiny.image_processor_class)(**copy.deepcopy(tiny.image_processor))
    kwargs: dict[str, Any] = copy.deepcopy(tiny.processor)
    attributes = processor_class.get_attributes()
    for name in attributes:
        modality = _get_modality_for_attribute(name)
        if modality in _DEFAULT_PARTS and name not in kwargs:
            kwargs[name] = _default_part(tiny, processor_class.__name__, modality)
        elif name in tiny.extra_tokenizers:  # a second tokenizer (InstructBLIP's qformer_tokenizer)
            kwargs[name] = build_extra_tokenizer(tiny.extra_tokenizers[name])
        elif name != "tokenizer" and modality == "tokenizer":
            raise ValueError(f"{processor_class.__name__} needs a {name}: describe it in tiny.extra_tokenizers")
        elif modality not in ("image_processor", "tokenizer", *_DEFAULT_PARTS):
            raise ValueError(f"{processor_class.__name__} needs a {name}, which build_tiny does not make")
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tiny.chat_template, **kwargs
    )


def _token_ids(tokenizer: transformers.TokenizersBackend, tokens: str | list[str]) -> int | list[int]:
    """One token's id, or a list of tokens' ids (config_token_ids values)."""
    return _token_id(tokenizer, tokens) if isinstance(tokens, str) else [_token_id(tokenizer, t) for t in tokens]


_TOKENIZER_LENGTH = "tokenizer.length"


def _config_value(config: Any, path: str) -> Any:
    """The value at a dotted path of a built config (sub-configs are attributes), class defaults included."""
    node = config
    for key in path.split("."):
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif hasattr(node, key):
            node = getattr(node, key)
        else:
            raise ValueError(f"tiny.derived: {path!r} is not a value of {type(config).__name__} ({key!r} is missing)")
    return copy.deepcopy(node)


def _build_config(tiny: TinyRecipe, tokenizer: transformers.TokenizersBackend, processor: ProcessorMixin) -> Any:
    config: dict[str, Any] = copy.deepcopy(tiny.config)
    for path, tokens in tiny.tokenizer.config_token_ids.items():
        _set_path(config, path, _token_ids(tokenizer, tokens))
    for name, spec in tiny.extra_tokenizers.items():
        extra = getattr(processor, name)
        for path, tokens in spec.config_token_ids.items():
            _set_path(config, path, _token_ids(extra, tokens))
        if spec.config_vocab_size:
            _set_path(config, spec.config_vocab_size, len(extra))
    config_class = _resolve(tiny.config_class)
    if tiny.derived:
        # Sources are read from a config built without the derived values (so a class default counts), then
        # the config is built again with them.
        first = config_class(**copy.deepcopy(config))
        for target, source in tiny.derived.items():
            value = len(tokenizer) if source == _TOKENIZER_LENGTH else _config_value(first, source)
            _set_path(config, target, value)
    built = config_class(**config)
    built.get_text_config(decoder=True).vocab_size = len(tokenizer)
    return built


def build_processor_and_config(tiny: TinyRecipe) -> tuple[ProcessorMixin, Any]:
    """The processor and model config that ``tiny`` describes, without weights (benchmarks size them up)."""
    tokenizer = build_tokenizer(tiny.tokenizer, tiny.chat_template)
    processor = _build_processor(tiny, tokenizer)
    # The processor may add tokens (Idefics3): read every id from the tokenizer as it left it.
    tokenizer = processor.tokenizer
    tokenizer.chat_template = tiny.chat_template
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


def build_tiny(tiny: TinyRecipe, out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Build a tiny random model and its processor from ``tiny`` and save both into ``out_dir``.

    The folder loads back with ``AutoProcessor.from_pretrained`` and ``AutoModelForImageTextToText``
    (or the named model class). The same ``tiny`` and ``seed`` give byte-identical weights and tokenizer.
    The folder is written next to ``out_dir`` and renamed at the end, so a failure leaves nothing behind.
    Raises ``FileExistsError`` if ``out_dir`` exists and is not empty, unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0o700
        processor, config = build_processor_and_config(tiny)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _resolve(tiny.model_class)(config).to(torch.float32).eval()
        set_parameters(model, tiny.parameters)
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
