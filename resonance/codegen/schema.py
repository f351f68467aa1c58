"""The pydantic schema of a model-family spec (``specs/<name>.yaml``).

Every string that reaches generated Python is validated here: names are identifiers, paths are
dotted identifiers, class names are identifiers. Free text (placeholders, templates) is only
ever emitted through ``repr`` by the compiler, never spliced into code.
"""

from __future__ import annotations

import keyword
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, PrivateAttr, model_validator

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DUNDER = re.compile(r"__\w*__")

# Adapter names that would collide with generated/'s own files (generated/registry.py, generated/__init__.py).
RESERVED_NAMES = frozenset({"registry"})


def _identifier(value: str) -> str:
    if not _IDENT.fullmatch(value) or keyword.iskeyword(value):
        raise ValueError(f"{value!r} is not a Python identifier (letters, digits and _, not starting with a digit)")
    if _DUNDER.fullmatch(value):
        raise ValueError(f"{value!r} is a dunder name (__x__), one of Python's own; name the real class or attribute")
    return value


def _dotted(value: str) -> str:
    parts = value.split(".")
    for part in parts:
        if not _IDENT.fullmatch(part) or keyword.iskeyword(part):
            raise ValueError(
                f"{value!r} is not a dotted path of identifiers (like 'model.language_model'); bad segment {part!r}"
            )
        if _DUNDER.fullmatch(part):
            raise ValueError(f"{value!r}: segment {part!r} is a dunder name (__x__), one of Python's own")
    return value


_VERSION_RANGE = re.compile(r"[0-9A-Za-z.*]* *(?:[<>=!~]=? *[0-9A-Za-z.*]+ *,? *)+")


def _version_range(value: str) -> str:
    if not _VERSION_RANGE.fullmatch(value):
        raise ValueError(f"{value!r} is not a version range like '>=5.20,<6'")
    return value


def _adapter_name(value: str) -> str:
    _identifier(value)
    if value != value.lower():
        raise ValueError(f"{value!r}: adapter names are lower case (like 'llava', 'qwen2_vl')")
    if value.startswith("_"):
        raise ValueError(f"{value!r}: adapter names start with a letter (a leading _ is Python's private or special)")
    if value in RESERVED_NAMES:
        raise ValueError(f"{value!r} is reserved: generated/{value}.py is the compiler's own file; choose another name")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
DottedPath = Annotated[str, AfterValidator(_dotted)]
AdapterName = Annotated[str, AfterValidator(_adapter_name)]
NonEmpty = Annotated[str, Field(min_length=1)]
Kwargs = dict[Identifier, JsonValue]  # keyword arguments: JSON data, finite floats (see _Strict)


class _Strict(BaseModel):
    """Unknown keys are errors; floats are finite everywhere (no spec field means anything by .inf or .nan)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Modules(_Strict):
    """Dotted attribute paths on the loaded ``*ForConditionalGeneration`` model."""

    language_model: DottedPath = Field(description="The decoder; LoRA `auto` targets live only under it.")
    vision_tower: DottedPath = Field(description="The image encoder frozen by --freeze_vision_tower.")
    projector: DottedPath | None = Field(None, description="The vision-to-text connector, if separate.")


class Lora(_Strict):
    """Default LoRA targets, matched by path under ``modules.language_model`` (never by leaf name alone)."""

    targets: list[Identifier] = Field(
        min_length=1, description="Linear leaf names inside the language model, e.g. q_proj, v_proj."
    )
    parameters: list[DottedPath] = Field(
        default_factory=list,
        description=(
            "Weight parameters that are no Linear layer, by the end of their names under the language model: a "
            "mixture-of-experts decoder's experts kept as 3-D parameters (mlp.experts.gate_up_proj, "
            "mlp.experts.down_proj), which LoRA reaches through peft's target_parameters (--lora_target_parameters)."
        ),
    )


class Moe(_Strict):
    """A mixture-of-experts decoder: where its routers are, and whether training adds their load-balancing loss."""

    router: list[DottedPath] = Field(
        default_factory=list,
        description=(
            "The routers, by the end of their module paths under the language model (mlp.gate): LoRA never lands "
            "on them unless --lora_target_modules names them, and verify checks it."
        ),
    )
    aux_loss: bool = Field(
        False,
        description=(
            "Whether training (SFT, DPO, RM, PPO, GRPO) adds the routers' load-balancing (auxiliary) loss by "
            "default, with the model's router_aux_loss_coef; --router_aux_loss_coef sets the coefficient (0 turns "
            "it off)."
        ),
    )


ImageLayout = Literal["per_image", "per_row", "per_patch", "per_tile"]


class ImageInput(_Strict):
    """One processor output forwarded to the model's forward."""

    name: Identifier = Field(description="The processor output's key, e.g. pixel_values or image_grid_thw.")
    layout: ImageLayout = Field(
        description=(
            "How the tensor's first axis is laid out: per_image (one entry per image), per_row (one entry "
            "per batch row), per_patch (patches of all images concatenated, sized by the grid input), "
            "per_tile (crops of all images concatenated, a varying number per image that the processor "
            "does not return, e.g. InternVL's crop_to_patches tiles)."
        )
    )
    source: Literal["conversation", "prompt"] = Field(
        "conversation",
        description=(
            "What the processor computes it from in training batches. conversation: the whole rendered "
            "conversation, like input_ids. prompt: each row's prompt only (the turns before its first supervised "
            "answer, rendered with the generation prompt, as at inference), for outputs that must not see the "
            "answers, like InstructBLIP's Q-Former text (qformer_input_ids) that conditions the image features."
        ),
    )


class Image(_Strict):
    """How images appear in prompts and which processor outputs the model consumes."""

    placeholder: NonEmpty = Field("<image>", description="The image marker in dataset prompts.")
    position: Literal["before", "after"] = Field(
        "before",
        description="Where format_multimodal_prompt puts missing image parts in the first user turn.",
    )
    token: NonEmpty = Field(description="The model's image token after the processor expands placeholders.")
    inputs: list[ImageInput] = Field(min_length=1, description="Processor outputs passed to forward().")
    grid_input: Identifier | None = Field(
        None, description="For per_patch layouts: the per-image grid input (t, h, w) that sizes each image."
    )
    multi_image: bool = Field(True, description="Whether one conversation may hold several images.")
    features_input: Identifier | None = Field(
        None,
        description=(
            "For models without transformers' get_image_features / mm_encoder_outputs whose forward() takes "
            "the projected image features under another argument (Mllama: cross_attention_states): with the "
            "tower and projector frozen, a batch's images are encoded once as projector(vision_tower(**image "
            "inputs).last_hidden_state) and passed under this name instead of the image inputs."
        ),
    )
    required: bool = Field(
        False,
        description=(
            "Whether every conversation needs at least one image: the processor cannot tokenize a row without "
            "one (PaliGemma's puts <bos> after the last <image> and refuses calls without images). Rows without "
            "images are then errors that name the row."
        ),
    )
    processor_kwargs: Kwargs = Field(
        default_factory=dict, description="Extra keyword arguments for the processor call (e.g. max_pixels)."
    )
    processor_backend: Literal["torchvision", "pil"] | None = Field(
        None,
        description=(
            "The image processor's backend (transformers' AutoImageProcessor backend). Unset: transformers' "
            "choice, the torchvision (fast) one where torchvision is installed. pil for a family whose torchvision "
            "image processor gets its batches wrong (Mllama's in transformers 5.24: rows without images)."
        ),
    )
    batched_attention: bool = Field(
        False,
        description=(
            "Whether the vision tower's attention modules take cu_seqlens segments (Qwen-VL towers: one per image, "
            "or per window in Qwen2.5-VL) that sdpa would run as one call per segment; true runs them as one "
            "batched sdpa call over padded segments instead (resonance.patches.vision_attention)."
        ),
    )

    @model_validator(mode="after")
    def _grid_for_patches(self) -> Image:
        names = [i.name for i in self.inputs]
        if any(i.layout == "per_patch" for i in self.inputs):
            if self.grid_input is None:
                raise ValueError("grid_input: required when an input has layout per_patch (e.g. image_grid_thw)")
            if self.grid_input not in names:
                raise ValueError(f"grid_input: {self.grid_input!r} must be one of inputs {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"inputs: duplicate names in {names}")
        return self


VideoLayout = Literal["per_video", "per_row", "per_patch", "per_frame", "per_tile"]


class VideoInput(_Strict):
    """One processor video output forwarded to the model's forward."""

    name: Identifier = Field(description="The processor output's key, e.g. pixel_values_videos or video_grid_thw.")
    layout: VideoLayout = Field(
        description=(
            "How the tensor's first axis is laid out, as for image.inputs: per_video (one entry per video, like "
            "per_image), per_row (one entry per batch row), per_patch (patches of all videos' frames concatenated, "
            "sized by the grid input), per_frame (frames of all videos concatenated, sized by the frames input: "
            "Gemma 4's pixel_values_videos), per_tile (the tiles of the images and frames of the videos, in "
            "order: an image input the videos' frames join)."
        )
    )


class VideoSampling(_Strict):
    """Which frames of a video file reach the processor: the arguments of the HF video processor's own
    ``sample_frames`` (transformers' ``fps`` / ``num_frames``); unset, the video processor's defaults."""

    fps: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Frames sampled per second of video (the video processor's fps); not with num_frames."
    )
    num_frames: Annotated[int, Field(gt=0)] | None = Field(
        None, description="Frames sampled from each video, evenly spaced (the video processor's num_frames)."
    )
    frames_fps: Annotated[float, Field(gt=0)] = Field(
        2.0,
        description=(
            "The frame rate a video given as a list of frame images is taken to have been sampled at (its frames "
            "are used as given, never resampled), for the timestamps a processor derives (Qwen2.5-VL's "
            "second_per_grid_ts, Qwen3-VL's <t seconds> text); LLaMA-Factory's video_fps default."
        ),
    )

    equal_frames: bool = Field(
        False,
        description=(
            "Whether the processor stacks a batch's videos into one tensor (videos, frames, ...), as LLaVA-OneVision's "
            "and InternVL's do: every video then reaches it with exactly num_frames frames (required). A video file "
            "is sampled to num_frames; a list of more frames is sampled down the same way; a video with fewer is a "
            "row error."
        ),
    )

    @model_validator(mode="after")
    def _one_rate(self) -> VideoSampling:
        if self.fps is not None and self.num_frames is not None:
            raise ValueError("fps and num_frames: give one (transformers' video processors take one or the other)")
        if self.equal_frames and self.num_frames is None:
            raise ValueError(
                "equal_frames: needs num_frames, the number of frames every video reaches the processor with"
            )
        return self


class Video(_Strict):
    """How videos appear in prompts and which video processor outputs the model consumes. A family without this
    section takes no video: a row holding one is refused by name."""

    placeholder: NonEmpty = Field("<video>", description="The video marker in dataset prompts.")
    token: NonEmpty = Field(
        description=(
            "The model's video token after the processor expands placeholders: the image token where the processor "
            "writes a video as frames of image tokens: InternVL (its frames join the images' inputs) and GLM-4.1V "
            "(its videos have inputs of their own, and mm_token_type_ids tell a video's tokens from an image's)."
        )
    )
    inputs: list[VideoInput] = Field(
        min_length=1,
        description=(
            "Video processor outputs passed to forward(). An input named as one of image.inputs is that same "
            "tensor: the processor puts the videos' frames among the images' (InternVL's pixel_values), and its "
            "layout is the image input's."
        ),
    )
    grid_input: Identifier | None = Field(
        None, description="For per_patch layouts: the per-video grid input (t, h, w) that sizes each video."
    )
    frames_input: Identifier | None = Field(
        None,
        description=(
            "For per_frame layouts: the per_video input holding each video's frame count (e.g. "
            "num_frames_per_video), which sizes each video."
        ),
    )
    sampling: VideoSampling = Field(
        VideoSampling(), description="Which frames of a video file the processor gets (fps or num_frames)."
    )
    processor_kwargs: Kwargs = Field(
        default_factory=dict,
        description="Extra keyword arguments for the processor call with videos (e.g. the video processor's size).",
    )
    with_images: bool = Field(
        True,
        description=(
            "Whether the processor takes images and videos in one call. false for SmolVLM's, whose videos' frames "
            "replace a call's images: a conversation holding both is a row error, and a batch with rows of each "
            "kind is processed in one call per kind, joined row by row (image and video inputs laid out per_row)."
        ),
    )
    chat_template: str | None = Field(
        None,
        description=(
            "The chat template a conversation holding a video renders with, where the HF processor's "
            "apply_chat_template swaps one in for such conversations whatever the checkpoint's (SmolVLM's: "
            "transformers' DEFAULT_CHAT_TEMPLATE in processing_smolvlm.py, verbatim); unset, the model's template."
        ),
    )

    @model_validator(mode="after")
    def _grid_for_patches(self) -> Video:
        names = [i.name for i in self.inputs]
        if any(i.layout == "per_patch" for i in self.inputs):
            if self.grid_input is None:
                raise ValueError("grid_input: required when an input has layout per_patch (e.g. video_grid_thw)")
            if self.grid_input not in names:
                raise ValueError(f"grid_input: {self.grid_input!r} must be one of inputs {names}")
        if any(i.layout == "per_frame" for i in self.inputs):
            if self.frames_input is None:
                raise ValueError(
                    "frames_input: required when an input has layout per_frame (e.g. num_frames_per_video)"
                )
            per_video = [i.name for i in self.inputs if i.layout == "per_video"]
            if self.frames_input not in per_video:
                raise ValueError(f"frames_input: {self.frames_input!r} must be one of the per_video inputs {per_video}")
        if len(set(names)) != len(names):
            raise ValueError(f"inputs: duplicate names in {names}")
        return self


class ChatTemplate(_Strict):
    """Which chat template renders conversations."""

    source: Literal["model", "inline"] = Field(
        "model", description="model: the checkpoint's own template; inline: `template` below."
    )
    template: str | None = Field(None, description="A Jinja chat template, required for source: inline.")
    answer: Literal["template", "suffix"] = Field(
        "template",
        description=(
            "How the answer to learn reaches the processor. template: the chat template renders the whole "
            "conversation and labels are the assistant turns' spans. suffix: the template renders the prompt "
            "(every turn before the last, which must be the assistant's, with the generation prompt) and the "
            "last assistant turn's text goes to the processor's `suffix` argument, which tokenizes it after "
            "the prompt and returns its labels (PaliGemma: processor(text=prompt, suffix=answer)); earlier "
            "assistant turns are then part of the prompt and are not supervised."
        ),
    )

    text_messages: Literal["parts", "string"] = Field(
        "parts",
        description=(
            "How a message without images reaches the template. parts: a list of {type: text} parts, like "
            "messages with images. string: its text as a plain string, for templates that read some roles' "
            "content as a string (Llama 3.2 Vision's system message: `messages[0]['content']|trim`), which "
            "would otherwise render the list itself."
        ),
    )

    training: Literal["model", "trl"] = Field(
        "model",
        description=(
            "The template training conversations render with. model: the checkpoint's (or inline) template. trl: "
            "TRL's training variant of it (trl.chat_template_utils.get_training_chat_template), for thinking "
            "templates that render earlier assistant turns otherwise than the last (Qwen3.5's drops their think "
            "blocks), so no prefix renders as the whole conversation does; prompts at inference keep the model's "
            "template. A template TRL has no variant for is an error naming this field."
        ),
    )
    images: Literal["inline", "leading"] = Field(
        "inline",
        description=(
            "Where the template writes images. inline: where their parts are, in their messages. leading: every "
            "image of the conversation before the first turn, whichever message holds it (Molmo2's); the label "
            "code then renders each prefix with the later messages' images too, so it starts as the whole "
            "conversation does (verify checks the claim)."
        ),
    )
    system: bool = Field(
        True,
        description=(
            "Whether the template takes a system message. false for templates that refuse one (Molmo2's: roles "
            "must alternate user/assistant): a row holding one is then refused by name, and verify checks the "
            "template does refuse it."
        ),
    )
    stop_token: NonEmpty | None = Field(
        None,
        description=(
            "For templates that write no end-of-turn token after an answer (GLM-4V's: the next turn's <|user|> "
            "follows, and a conversation ends with the answer's text): the token the model must learn to emit after "
            "each answer in training, one token of the tokenizer and one generation stops at. An answer followed "
            "by it in the rendering gets it supervised; one followed by anything else (the last) gets it written "
            "after its text. Prompts at inference are unchanged. Not with answer: suffix (the processor ends the "
            "suffix itself)."
        ),
    )

    @model_validator(mode="after")
    def _inline_needs_template(self) -> ChatTemplate:
        if self.source == "inline" and not self.template:
            raise ValueError("template: required when source is 'inline'")
        if self.source == "model" and self.template is not None:
            raise ValueError("template: only allowed with source: inline")
        if self.stop_token is not None and self.answer == "suffix":
            raise ValueError("stop_token: not with answer: suffix (the processor ends the suffix answer itself)")
        return self


class Padding(_Strict):
    """Which side the tokenizer pads batches on."""

    train: Literal["left", "right"] = Field("right", description="Padding side of training batches.")
    infer: Literal["left", "right"] = Field(
        "left", description="Padding side of generation batches (left, so every prompt ends where generation starts)."
    )


class Overrides(_Strict):
    """Hand-written hooks (generation-gap pattern): ``module`` defines functions named after the hooks."""

    module: DottedPath = Field(description="Importable hand-written module, e.g. resonance.overrides.qwen2_vl.")
    hooks: list[DottedPath] = Field(
        min_length=1,
        description="Hooks taken from the module, as Class.method, e.g. processor.format_multimodal_prompt.",
    )


# Processor arguments build_tiny makes itself, and what it makes them from.
_BUILT_PROCESSOR_KWARGS = {
    "tokenizer": "tiny.tokenizer",
    "image_processor": "tiny.image_processor_class and tiny.image_processor",
    "chat_template": "tiny.chat_template",
}


def _processor_kwarg(value: str) -> str:
    _identifier(value)
    if value in _BUILT_PROCESSOR_KWARGS:
        raise ValueError(f"{value!r} is built from {_BUILT_PROCESSOR_KWARGS[value]}, not passed as a processor kwarg")
    return value


ProcessorKwargs = dict[Annotated[str, AfterValidator(_processor_kwarg)], JsonValue]
ConfigTokenIds = Annotated[
    dict[DottedPath, NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)]],
    Field(
        default_factory=dict,
        description=(
            "Config paths (dotted, e.g. text_config.pad_token_id) set to these tokens' ids, read from the tokenizer "
            "as the processor left it; each token must be a single token of this tokenizer. A list of tokens sets "
            "the path to the list of their ids (a config field holding several, like generation stop ids)."
        ),
    ),
]
ConfigVocabSize = Annotated[
    DottedPath | None,
    Field(None, description="A config path (e.g. qformer_config.vocab_size) set to this tokenizer's length."),
]


def _special(name: str) -> Any:
    return Field(None, description=f"The {name} token, a special token with one of the first ids.")


class TinyTokenizer(_Strict):
    """The tiny checkpoint's tokenizer: a byte-level BPE trained offline on a built-in corpus and the chat template.

    Special tokens get the first ids, in the order: bos, eos, pad, unk, ``special_tokens``, then any
    ``named_special_tokens`` not listed before.
    """

    vocab_size: int = Field(400, gt=0, description="Size of the trained BPE vocabulary, special tokens included.")
    special_tokens: list[NonEmpty] = Field(
        default_factory=list, description="Added as special tokens (never split), ids right after bos/eos/pad/unk."
    )
    named_special_tokens: dict[Identifier, NonEmpty] = Field(
        default_factory=dict,
        description=(
            "Model-specific special tokens the processor reads by attribute name, as a real tokenizer_config names "
            "them (InternVL's context_image_token): the tokenizer exposes tokenizer.<name> and tokenizer.<name>_id."
        ),
    )
    bos_token: NonEmpty | None = _special("beginning-of-sequence")
    eos_token: NonEmpty | None = _special("end-of-sequence")
    pad_token: NonEmpty | None = _special("padding")
    unk_token: NonEmpty | None = _special("unknown")
    add_bos_token: bool = Field(False, description="Whether the tokenizer prepends bos_token (Llama style).")
    add_eos_token: bool = Field(False, description="Whether the tokenizer appends eos_token.")
    config_token_ids: ConfigTokenIds
    pre_tokenizer_pattern: NonEmpty | None = Field(
        None,
        description=(
            "The family's split regex (a tokenizer.json pre_tokenizer's, e.g. Llama 3's), applied before the bytes; "
            "default: GPT-2's."
        ),
    )


class BpeExtraTokenizer(TinyTokenizer):
    """A processor's second tokenizer, byte-level BPE like ``tiny.tokenizer``."""

    kind: Literal["bpe"] = Field(description="bpe: byte-level BPE, the keys of tiny.tokenizer.")
    config_vocab_size: ConfigVocabSize


class WordpieceTokenizer(_Strict):
    """A processor's second tokenizer, BERT-style: lower-cased WordPiece, ``[CLS] text [SEP]``.

    Special tokens get the first ids, in the order: pad, unk, cls, sep, mask, then ``special_tokens``.
    """

    kind: Literal["wordpiece"] = Field(description="wordpiece: BERT-style WordPiece (or bpe).")
    vocab_size: int = Field(200, gt=0, description="Size of the vocabulary, special tokens included.")
    lowercase: bool = Field(True, description="Whether text is lower-cased before it is split (bert-base-uncased).")
    special_tokens: list[NonEmpty] = Field(
        default_factory=list, description="Added as special tokens, ids right after pad/unk/cls/sep/mask."
    )
    pad_token: NonEmpty | None = _special("padding")
    unk_token: NonEmpty | None = Field(
        None, description="The unknown token (the WordPiece model's unk: [UNK] if unset)."
    )
    cls_token: NonEmpty | None = Field(None, description="The classification token, written before the text.")
    sep_token: NonEmpty | None = Field(None, description="The separator token, written after the text.")
    mask_token: NonEmpty | None = _special("mask")
    config_vocab_size: ConfigVocabSize
    config_token_ids: ConfigTokenIds


ExtraTokenizer = Annotated[WordpieceTokenizer | BpeExtraTokenizer, Field(discriminator="kind")]


class Tiny(_Strict):
    """A tiny random-weight configuration that builds offline (see resonance/tiny.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    config_class: Identifier = Field(description="The transformers config class, e.g. LlavaConfig.")
    config: Kwargs = Field(
        default_factory=dict,
        description=(
            "Keyword arguments to config_class (nested text_config / vision_config mappings allowed); the text "
            "vocab size and tokenizer.config_token_ids are filled from the tokenizer."
        ),
    )
    processor: ProcessorKwargs = Field(
        default_factory=dict,
        description=(
            "Extra keyword arguments to processor_class (its tokenizer, image processor and chat template are "
            "built from the other fields)."
        ),
    )
    image_processor_class: Identifier = Field(
        description="The transformers image processor class, e.g. CLIPImageProcessorPil."
    )
    image_processor: Kwargs = Field(default_factory=dict, description="Keyword arguments to image_processor_class.")
    video_processor: Kwargs = Field(
        default_factory=dict,
        description=(
            "Keyword arguments to the family's default video processor (the class transformers maps the config's "
            "model type to), for processors that take one: small frame sizes keep video tests fast."
        ),
    )
    tokenizer: TinyTokenizer = Field(
        default_factory=TinyTokenizer, description="BPE size, special tokens, and config fields set to token ids."
    )
    chat_template: str | None = Field(
        description=(
            "The family's real chat template, saved with the tiny checkpoint; null when the real checkpoints "
            "ship none (then chat_template.source must be inline)."
        )
    )
    extra_tokenizers: dict[Identifier, ExtraTokenizer] = Field(
        default_factory=dict,
        description=(
            "The processor's other tokenizers by attribute name (InstructBLIP's qformer_tokenizer): kind "
            "(wordpiece: BERT-style, or bpe), vocab size, special tokens, config_vocab_size (the config path set "
            "to its length) and config_token_ids."
        ),
    )
    derived: dict[DottedPath, DottedPath] = Field(
        default_factory=dict,
        description=(
            "Config paths set from another value, so sizes the model keeps in more than one place never need "
            "matching by hand: `tokenizer.length` (the tiny tokenizer's length, e.g. for a vocabulary size kept "
            "outside the text config) or another config path (e.g. vision_config.out_hidden_size: "
            "text_config.hidden_size), read from the built config, class defaults included."
        ),
    )
    parameters: dict[NonEmpty, float] = Field(
        default_factory=dict,
        description=(
            "Parameters, by glob pattern over their names, set to a constant after the random init: for weights "
            "a trained checkpoint has away from an init that would cut a path off (Mllama's zero tanh gates)."
        ),
    )


# The JSON Schema's identity and dialect (pydantic writes draft 2020-12), stated in the schema itself so that
# editors and validators need not guess; the file that ships it: resonance/codegen/schema_file.py.
SCHEMA_ID = "urn:resonance:model-spec"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class ModelSpec(_Strict):
    """One model family: everything the compiler needs to write its adapter module."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        protected_namespaces=(),
        json_schema_extra={"$id": SCHEMA_ID, "$schema": SCHEMA_DIALECT},
    )

    name: AdapterName = Field(description="The adapter's name: a lower-case Python identifier.")
    architectures: list[Identifier] = Field(
        min_length=1, description="config.json `architectures` values this adapter serves."
    )
    model_class: Identifier = Field(description="The transformers model class, e.g. LlavaForConditionalGeneration.")
    processor_class: Identifier = Field(description="The transformers processor class, e.g. LlavaProcessor.")
    transformers: Annotated[str, AfterValidator(_version_range)] = Field(
        description="The transformers version range this spec was verified with."
    )
    trust_remote_code: bool = Field(
        False, description="Whether loading runs the checkpoint's own Python code (transformers' trust_remote_code)."
    )
    modules: Modules = Field(description="Where the language model, vision tower and projector sit in the model.")
    lora: Lora = Field(description="The default LoRA targets (--lora_target_modules auto).")
    moe: Moe = Field(Moe(), description="For a mixture-of-experts decoder: its routers and their auxiliary loss.")
    image: Image = Field(description="How images appear in prompts and which processor outputs reach forward().")
    video: Video | None = Field(
        None,
        description=(
            "How videos appear in prompts and which processor outputs reach forward(); unset: the family takes no "
            "video, and a row holding one is refused by name."
        ),
    )
    chat_template: ChatTemplate = Field(
        ChatTemplate(), description="Which chat template renders conversations, and how answers are supervised."
    )
    padding_side: Padding = Field(Padding(), description="The padding side for training and for generation.")
    generation: Kwargs = Field(
        default_factory=lambda: {"max_new_tokens": 1024, "do_sample": False},
        description="Default generation kwargs.",
    )
    flash_attention: bool = Field(False, description="Whether the family supports flash-attention 2.")
    position_ids: Literal["1d", "3d"] = Field("1d", description="Rope position kind; 3d for Qwen's M-RoPE.")
    token_type_ids: Literal["processor", "prefix_lm"] = Field(
        "processor",
        description=(
            "processor: token_type_ids, where the processor returns them, go to forward as it made them "
            "(Gemma 3's image-token marks). prefix_lm: the model attends bidirectionally over tokens of type "
            "0 and causally from the first token of type 1 (PaliGemma); training batches get 0 before each "
            "row's first supervised token and 1 from it on (padding 0), so no supervised token is visible "
            "to the positions before it. Inference batches keep the processor's (all 0: the whole prompt is "
            "the prefix)."
        ),
    )
    shared_prompt: bool = Field(
        True,
        description=(
            "Whether a preference pair may run as one row, chosen and rejected over a single copy of their "
            "prompt, under a custom 4-D attention mask (causal; each answer sees the prompt and itself) with "
            "explicit position ids. false for families whose own mask is not plain causal over the text "
            "(bidirectional image or prefix blocks, sliding windows), which a custom mask would replace."
        ),
    )
    overrides: Overrides | None = Field(
        None, description="Hand-written hook functions, in an importable module, for what the other fields cannot say."
    )
    tiny: Tiny = Field(description="How to build a tiny random-weight checkpoint offline (resonance tiny).")

    @model_validator(mode="after")
    def _experts_have_routers(self) -> ModelSpec:
        if self.lora.parameters and not self.moe.router:
            raise ValueError(
                "moe.router: required with lora.parameters (the expert weights): name the routers, which LoRA must "
                "not reach (e.g. [mlp.gate])"
            )
        return self

    @model_validator(mode="after")
    def _video_inputs_shared_alike(self) -> ModelSpec:
        if self.video is not None and not self.video.with_images:
            layouts = sorted({i.layout for i in (*self.image.inputs, *self.video.inputs)} - {"per_row"})
            if layouts:
                raise ValueError(
                    f"video.with_images: false joins a batch's image rows and video rows row by row, so every image "
                    f"and video input must be laid out per_row; got {layouts}"
                )
        if self.video is not None and self.video.chat_template is not None and self.chat_template.training == "trl":
            raise ValueError(
                "video.chat_template: not with chat_template.training: trl (TRL's training variant is of the model's "
                "template)"
            )
        if self.video is not None:
            image_layouts = {i.name: i.layout for i in self.image.inputs}
            for index, item in enumerate(self.video.inputs):
                if item.name in image_layouts and item.layout != image_layouts[item.name]:
                    raise ValueError(
                        f"video.inputs.{index}: {item.name!r} is an image input too (the processor puts the videos' "
                        f"frames among the images'), so its layout is the image input's, {image_layouts[item.name]}; "
                        f"got {item.layout}"
                    )
        return self

    @model_validator(mode="after")
    def _template_somewhere(self) -> ModelSpec:
        if self.tiny.chat_template is None and self.chat_template.source != "inline":
            raise ValueError(
                "tiny.chat_template: null (the checkpoints ship no chat template) needs chat_template.source: "
                "inline with a template"
            )
        return self

    _positions: dict[tuple[str | int, ...], tuple[int, int]] = PrivateAttr(default_factory=dict)

    def position(self, *loc: str | int) -> tuple[int, int]:
        """1-based (line, column) of a field in the spec file (the nearest enclosing one that is known)."""
        while loc and loc not in self._positions:
            loc = loc[:-1]
        return self._positions.get(loc, (1, 1))

    @property
    def class_prefix(self) -> str:
        """CamelCase stem for generated class names: qwen2_vl -> Qwen2Vl."""
        return "".join(part[:1].upper() + part[1:] for part in self.name.split("_"))
