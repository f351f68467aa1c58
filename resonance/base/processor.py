"""VLProcessor: one family's HF processor behind the seed's processor API, plus label building.

Token parity with the family's own processor is by construction: conversations are rendered with
the family's chat template and tokenized by the family's processor in one call per batch. Labels
come from the assistant turns' character spans in the rendered text, mapped onto the processor's
tokens (see :meth:`VLProcessor.process_batch_conv`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import AutoImageProcessor, AutoProcessor, BatchFeature, ProcessorMixin

from resonance.base.chat_template import ChatTemplate
from resonance.base.checks import (
    backends_named,
    image_output_problems,
    raise_problems,
    spec_file,
    token_problems,
    video_output_problems,
)
from resonance.base.registry import check_processor_files
from resonance.data.images import ImageCount
from resonance.data.videos import LoadedVideo, video_parts
from resonance.errors import ChatTemplateError, CheckpointError, RowError

IGNORE_INDEX = -100

Message = dict[str, Any]


@dataclass(frozen=True)
class ImageInput:
    """A processor output that goes to ``forward``, and how its first axis is laid out."""

    name: str
    layout: str  # per_image | per_row | per_patch | per_tile; videos: per_video | per_row | per_patch | per_frame
    from_prompt: bool = False  # spec source: prompt (computed from each row's prompt, see process_batch_conv)


VIDEO_TOKEN_TYPE = 2  # a video token's mm_token_type_ids value (transformers' create_mm_token_type_ids)


@dataclass(frozen=True)
class VideoSupport:
    """A family's videos (spec ``video``): the token each video expands into, the processor outputs that go to
    ``forward`` (layouts as for images, ``per_video`` for one entry per video), and which frames of a video file the
    processor gets (the video processor's own ``sample_frames`` with ``fps`` or ``num_frames``)."""

    token: str
    inputs: list[ImageInput]
    grid_input: str | None = None
    frames_input: str | None = None  # the per_video frame counts that size per_frame inputs
    placeholder: str = "<video>"
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    fps: float | None = None
    num_frames: int | None = None
    frames_fps: float = 2.0  # the rate a list of frame images is taken to have been sampled at
    equal_frames: bool = False  # every video reaches the processor with exactly num_frames frames (stacked)
    with_images: bool = True  # False: the processor takes images or videos in one call, not both (SmolVLM)
    chat_template: str | None = None  # the template a conversation with a video renders with (SmolVLM), None: model's

    @property
    def fixed_frames(self) -> int | None:
        """The frames every video reaches the processor with (num_frames, where equal_frames), or None: any count."""
        return self.num_frames if self.equal_frames else None

    def sampling(self) -> dict[str, Any]:
        """The keyword arguments of the video processor's ``sample_frames`` the spec sets."""
        return {k: v for k, v in (("fps", self.fps), ("num_frames", self.num_frames)) if v is not None}


def supervised_turns(messages: list[Message], first_supervised: int = 0) -> list[int]:
    """Indices of the assistant turns to learn: at index >= ``first_supervised`` and not marked ``train: False``.

    A canonical message's ``train`` is None (the default: an assistant turn is learned) or False (the turn is
    context, like a user turn: ms-swift's ``"loss": false``, a prompt-completion row's prompt turns).
    """
    return [
        index
        for index, message in enumerate(messages)
        if index >= first_supervised and message["role"] == "assistant" and message.get("train") is not False
    ]


def _for_template(message: Message, as_string: bool) -> Message:
    """The message as the chat template gets it: without the loader's ``train`` flag (a template that renders a
    message's keys must render the same text with or without it), text as one string where the spec says so."""
    if "train" in message:
        message = {key: value for key, value in message.items() if key != "train"}
    return text_as_string(message) if as_string else message


def _image_parts(message: Message) -> int:
    content = message["content"]
    return 0 if isinstance(content, str) else sum(part["type"] == "image" for part in content)


def message_text(message: Message) -> str:
    """A message's text: its string content, or its text parts joined."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text") or "" for p in content if p["type"] == "text")


def text_as_string(message: Message) -> Message:
    """A message without image parts with its text as one string (spec chat_template.text_messages: string)."""
    content = message["content"]
    if isinstance(content, str) or any(part["type"] != "text" for part in content):
        return message
    return {**message, "content": "".join(part["text"] or "" for part in content)}


def _load_hf_processor(
    folder: Path, kwargs: dict[str, Any], owner: type, image_backend: str | None = None
) -> ProcessorMixin:
    """The family's HF processor from a checkpoint folder; missing or broken files are a CheckpointError naming
    the file, found before transformers reads them (and from transformers' own error otherwise). A processor part
    that needs a package not installed here (torchvision, num2words...) is a MissingBackendError naming the spec
    of ``owner`` (the adapter's processor class), the part and the package.

    ``image_backend`` (spec image.processor_backend) replaces the image processor with that backend's. It is not
    passed to AutoProcessor, which would ask the video processor for it too (video processors are torchvision's).
    """
    check_processor_files(folder)
    try:
        with backends_named(f"{spec_file(owner)}: processor_class", owner.hf_processor_class):
            processor = AutoProcessor.from_pretrained(str(folder), **kwargs)
            if image_backend is not None:
                processor.image_processor = AutoImageProcessor.from_pretrained(
                    str(folder), backend=image_backend, **kwargs
                )
        return processor
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{folder}: cannot load the processor: {exc}") from exc


def _pad_rows(values: list[torch.Tensor], pad: int, side: str) -> torch.Tensor:
    """Tensors of rows (rows, n, ...) padded along their second axis to the longest with ``pad`` (on the ``side``
    "right" or "left"), then stacked along the rows."""
    width = max(value.shape[1] for value in values)
    padded = []
    for value in values:
        filler = value.new_full((value.shape[0], width - value.shape[1], *value.shape[2:]), pad)
        padded.append(torch.cat([value, filler] if side == "right" else [filler, value], dim=1))
    return torch.cat(padded)


class VLProcessor:
    """Wraps the family's HF processor; subclasses (generated from specs) set the class attributes."""

    hf_processor_class: ClassVar[str]
    image_placeholder: ClassVar[str] = "<image>"
    image_placeholder_position: ClassVar[str] = "before"
    image_token: ClassVar[str]
    image_inputs: ClassVar[list[ImageInput]] = []
    image_grid_input: ClassVar[str | None] = None
    multi_image: ClassVar[bool] = True
    processor_call_kwargs: ClassVar[dict[str, Any]] = {}
    image_processor_backend: ClassVar[str | None] = None  # spec image.processor_backend
    train_padding_side: ClassVar[str] = "right"
    infer_padding_side: ClassVar[str] = "left"
    inline_chat_template: ClassVar[str | None] = None
    answer_as_suffix: ClassVar[bool] = False  # spec chat_template.answer: suffix
    prefix_lm: ClassVar[bool] = False  # spec token_type_ids: prefix_lm
    images_required: ClassVar[bool] = False  # spec image.required
    text_messages_as_string: ClassVar[bool] = False  # spec chat_template.text_messages: string
    stop_token: ClassVar[str | None] = None  # spec chat_template.stop_token
    takes_system: ClassVar[bool] = True  # spec chat_template.system
    images_lead: ClassVar[bool] = False  # spec chat_template.images: leading
    trl_training_template: ClassVar[bool] = False  # spec chat_template.training: trl
    video: ClassVar[VideoSupport | None] = None  # spec video: None, the family takes no video

    def __init__(self, processor: ProcessorMixin | str | Path, **kwargs: Any):
        if isinstance(processor, str | Path):
            processor = _load_hf_processor(Path(processor), kwargs, type(self), self.image_processor_backend)
        self.hf = processor
        if self.inline_chat_template is not None:
            self.hf.chat_template = self.inline_chat_template
        if not self.hf.chat_template:
            raise ChatTemplateError(
                f"{self._checkpoint_folder() or type(self).__name__}: the checkpoint has no chat template; set "
                f"chat_template.source: inline and chat_template.template in {spec_file(type(self))}"
            )
        raise_problems(type(self), token_problems(self))
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = None if self.video is None else self.tokenizer.convert_tokens_to_ids(self.video.token)
        self._image_outputs_checked = False
        self._video_outputs_checked = False
        self.train()
        self._check_chat_template()

    # -- the seed's properties ---------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.hf.tokenizer

    @property
    def image_processor(self) -> Any:
        return self.hf.image_processor

    @property
    def chat_template(self) -> str:
        return self.hf.chat_template

    def placeholder_token_ids(self) -> list[int]:
        """Tokens that stand for image (or video) features: a model must never generate them, since a forward over
        a sequence holding one more of them than there are features fails (or misplaces the features)."""
        ids = {self.image_token_id, self.video_token_id}
        video = getattr(self.hf, "video_token_id", None)
        if isinstance(video, int):
            ids.add(video)
        unknown = self.tokenizer.unk_token_id
        return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != unknown)

    def save_pretrained(self, output_dir: str | Path) -> None:
        """Save the processor (chat template included) next to the trained weights."""
        self.hf.save_pretrained(str(output_dir))

    def train(self) -> None:
        """Training mode: the spec's training padding side (right for all current families)."""
        self.tokenizer.padding_side = self.train_padding_side
        self.padding_side = self.train_padding_side

    def infer(self) -> None:
        """Inference mode: left padding, so generation continues each row at the same position."""
        self.tokenizer.padding_side = self.infer_padding_side
        self.padding_side = self.infer_padding_side

    # -- prompts ---------------------------------------------------------------------------------

    def format_multimodal_prompt(self, prompt: str, num_images: int) -> str:
        """Put ``num_images`` placeholders into a raw prompt that has none (spec image.position)."""
        if num_images == 0 or self.image_placeholder in prompt:
            return prompt
        marks = self.image_placeholder * num_images
        return f"{marks}\n{prompt}" if self.image_placeholder_position == "before" else f"{prompt}\n{marks}"

    def remove_image_placeholder(self, prompt: str) -> str:
        return prompt.replace(self.image_placeholder + "\n", "").replace(self.image_placeholder, "")

    def is_multimodal_prompt_valid(self, prompt: str) -> bool:
        return self.image_placeholder in prompt

    # -- chat rendering and label spans ------------------------------------------------------------

    def render_conversation(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """The conversation as the family's chat template renders it (byte for byte what the HF processor's
        ``apply_chat_template`` returns), within a time and size budget (:mod:`resonance.base.chat_template`).
        Messages' ``train`` flags are not passed to the template."""
        template = self._video_template() if video_parts(messages) else None
        messages = [_for_template(message, self.text_messages_as_string) for message in messages]
        return (template or self.chat_template_source()).render(
            messages, add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map
        )

    def _video_template(self) -> ChatTemplate | None:
        """The template a conversation holding a video renders with (spec video.chat_template: the one the HF
        processor's apply_chat_template swaps in for such conversations), or None: the model's."""
        if self.video is None or self.video.chat_template is None:
            return None
        if getattr(self, "_video_chat_template", None) is None:
            self._video_chat_template = ChatTemplate(
                self.video.chat_template, f"{spec_file(type(self))}: video.chat_template"
            )
        return self._video_chat_template

    def render_training(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """The conversation as training renders it: :meth:`render_conversation`, or with TRL's training variant of
        the template where the spec says so (chat_template.training: trl)."""
        if not self.trl_training_template:
            return self.render_conversation(messages, add_generation_prompt)
        messages = [_for_template(message, self.text_messages_as_string) for message in messages]
        return self.training_template_source().render(
            messages, add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map
        )

    def training_template_source(self) -> ChatTemplate:
        """TRL's training variant of the template in use (prefix-preserving, with generation markers), worked out
        once per template; a template TRL has no variant for is a ChatTemplateError naming the spec field."""
        from trl.chat_template_utils import get_training_chat_template

        model = self.chat_template_source()
        cached = getattr(self, "_training_template", None)
        if cached is not None and cached[0] == model.source:
            return cached[1]
        try:
            variant = get_training_chat_template(self.hf)
        except ValueError as exc:
            raise ChatTemplateError(
                f"{spec_file(type(self))}: chat_template.training: trl, but TRL has no training variant of "
                f"{model.origin}: {exc}"
            ) from exc
        training = model if variant is None else ChatTemplate(variant, f"TRL's training variant of {model.origin}")
        self._training_template = (model.source, training)
        return training

    def chat_template_source(self) -> ChatTemplate:
        """The chat template in use and where it came from: the spec's inline template, or the checkpoint's file.
        Worked out once per template (every row renders through it; finding the origin reads the folder)."""
        template = self.hf.chat_template
        if isinstance(template, dict):  # several named templates: transformers renders the "default" one
            template = template.get("default") or ""
        cached = getattr(self, "_chat_template", None)
        if cached is not None and cached.source == template:
            return cached
        if self.inline_chat_template is not None:
            origin = f"{spec_file(type(self))}: chat_template.template"
        else:
            folder = self._checkpoint_folder()
            files = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")
            found = next((folder / name for name in files if folder and (folder / name).is_file()), None)
            origin = str(found or folder or f"the chat template of {self.hf_processor_class}")
        self._chat_template = ChatTemplate(template, origin)
        return self._chat_template

    def _checkpoint_folder(self) -> Path | None:
        name = getattr(self.tokenizer, "name_or_path", None)
        return Path(name) if name and Path(name).is_dir() else None

    def _check_chat_template(self) -> None:
        """Render a sample conversation once, so that a broken template fails here, before any model loads: it must
        compile, render within budget, and show the user's words (a template that renders nothing, or ignores the
        messages, would train on text without the conversation)."""
        template = self.chat_template_source()
        template.compile()
        question = "Which colour is the square?"
        parts = [{"type": "image", "text": None}, {"type": "text", "text": question}]
        conversation = [{"role": "user", "content": parts}]
        text = self.render_conversation(conversation, add_generation_prompt=True)
        if not text.strip():
            raise ChatTemplateError(f"{template.origin}: the chat template renders nothing for a user message")
        if question not in text:
            raise ChatTemplateError(
                f"{template.origin}: the chat template does not render the messages' text (a user message "
                f"{question!r} rendered as {text[:200]!r}); it must loop over messages"
            )

    def assistant_char_spans(self, messages: list[Message], first_supervised: int) -> list[tuple[int, int]]:
        """Character spans of the turns to learn (:func:`supervised_turns`: assistant turns at index >=
        ``first_supervised`` not marked ``train: False``) in the rendering; an override must keep that rule.

        A turn's span runs from the end of the prefix rendered with the generation prompt to the end
        of the prefix rendered with that turn (content and end-of-turn marker), less trailing white
        space. Rendering is per turn; tokenization stays once per conversation.

        Where the template writes every image first (spec chat_template.images: leading), the prefixes are
        rendered with the later messages' images too, so they start as the whole conversation does. Where the
        history writes a turn's opening otherwise than the generation prompt (Molmo2's " <|im_start|>assistant"),
        the span is the turn's own text, found at the end of the prefix rendered with it.
        """
        full = self.render_training(messages, add_generation_prompt=False)
        spans = []
        for index in supervised_turns(messages, first_supervised):
            before = self.render_training(self._prefix(messages, index), add_generation_prompt=True)
            through = self.render_training(self._prefix(messages, index + 1), add_generation_prompt=False)
            end = len(through.rstrip())  # trailing white space after the end-of-turn marker: the separator
            answer = message_text(messages[index])
            if through.startswith(before):
                # Everything after the generation prompt is the model's to generate, leading space included
                start = len(before)
            elif answer and through.endswith(answer, 0, end):
                start = end - len(answer)
            else:
                start = None
            if start is None or not full.startswith(through):
                raise ValueError(
                    f"{type(self).__name__}: the chat template does not render conversations prefix-stably "
                    f"(turn {index}); override the processor.assistant_char_spans hook for this family"
                )
            if end > start:
                spans.append((start, end))
        return spans

    def _prefix(self, messages: list[Message], length: int) -> list[Message]:
        """The first ``length`` messages; where images lead (spec chat_template.images: leading), with the later
        messages' images added to the first user message, as the template writes them all before any turn."""
        later = sum(_image_parts(m) for m in messages[length:])
        prefix = list(messages[:length])
        first_user = next((i for i, m in enumerate(prefix) if m["role"] == "user"), None)
        if not self.images_lead or not later or first_user is None:
            return prefix
        content = prefix[first_user]["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        prefix[first_user] = {**prefix[first_user], "content": [{"type": "image", "text": None}] * later + parts}
        return prefix

    def supervised_text(self, messages: list[Message], first_supervised: int) -> tuple[str, list[tuple[int, int]]]:
        """The conversation rendered for training and the character spans of its turns to learn
        (:meth:`assistant_char_spans`). With a stop token (spec chat_template.stop_token), each span also covers
        the stop token after its answer: the one the rendering already has there (the next turn's marker), or one
        written right after the answer's text where the rendering has none (the conversation's last answer)."""
        text = self.render_training(messages, add_generation_prompt=False)
        spans = self.assistant_char_spans(messages, first_supervised)
        stop = self.stop_token
        if stop is None:
            return text, spans
        stopped, shift = [], 0
        for start, end in spans:
            start, end = start + shift, end + shift
            if not text.startswith(stop, end):
                text = text[:end] + stop + text[end:]
                shift += len(stop)
            stopped.append((start, end + len(stop)))
        return text, stopped

    # -- tokenization ------------------------------------------------------------------------------

    def __call__(
        self,
        text: list[str],
        images: list[list[Any]] | None = None,
        videos: list[list[LoadedVideo]] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize rendered conversations with their images and videos, exactly as the family's processor does.

        ``videos``: each row's videos, decoded, their frames already chosen (:meth:`frame_indices`), with the
        metadata the processor derives timestamps from; passed with ``do_sample_frames=False``."""
        has_images = images is not None and any(images)
        has_videos = videos is not None and any(videos)
        if has_images and has_videos and self.video is not None and not self.video.with_images:
            return self._call_per_kind(text, images, videos, **kwargs)
        call_kwargs = {**self.processor_call_kwargs, **kwargs}
        if has_videos:
            if self.video is None:
                raise ValueError(f"{type(self).__name__} takes no video: {spec_file(type(self))} has no video: section")
            flat = [video for row in videos for video in row]
            call_kwargs = {**self.video.processor_kwargs, **call_kwargs, "do_sample_frames": False}
            call_kwargs["videos"] = [video.frames for video in flat]
            call_kwargs["video_metadata"] = [video.metadata for video in flat]
        if text and not self._adds_special_tokens(text[0]):
            call_kwargs.setdefault("add_special_tokens", False)
        call_kwargs.setdefault("padding", True)
        call_kwargs.setdefault("return_tensors", "pt")
        call_kwargs.setdefault("padding_side", self.padding_side)
        batch = self.hf(text=text, images=images if has_images else None, **call_kwargs)
        from_prompt = [item.name for item in self.image_inputs if item.from_prompt]
        if has_images and from_prompt and call_kwargs["padding_side"] != self.train_padding_side:
            # Inputs computed from the prompt (InstructBLIP's Q-Former text) feed an encoder with absolute
            # positions: left padding would shift them, so a batched row would differ from the row alone.
            # They keep the training padding side, as in training.
            padded = self.hf(text=text, images=images, **{**call_kwargs, "padding_side": self.train_padding_side})
            for name in from_prompt:
                batch[name] = padded[name]
        if has_images and not self._image_outputs_checked:  # once: the spec's image fields fit this processor
            raise_problems(type(self), image_output_problems(self, batch))
            self._image_outputs_checked = True
        if has_videos and not self._video_outputs_checked:  # once: the spec's video fields fit this processor
            raise_problems(type(self), video_output_problems(self, batch))
            self._video_outputs_checked = True
        batch.pop("video_metadata", None)  # the processor's echo of its input, no model input
        return batch

    def _call_per_kind(
        self, text: list[str], images: list[list[Any]], videos: list[list[LoadedVideo]], **kwargs: Any
    ) -> BatchFeature:
        """A batch of image rows and video rows for a processor that takes one kind per call (spec
        video.with_images: false): one call for the rows with videos, one for the others, joined row by row in the
        batch's order. Token sequences are padded as the processor pads them; the per_row image and video inputs with
        zero frames, as the processor pads a row of fewer images (the model drops all-zero ones)."""
        if any(row_images and row_videos for row_images, row_videos in zip(images, videos, strict=True)):
            raise ValueError(
                f"{type(self).__name__}: a row with images and videos, which its processor takes one or the other of "
                f"({spec_file(type(self))}: video.with_images: false)"
            )
        with_videos = [index for index, row in enumerate(videos) if row]
        others = [index for index, row in enumerate(videos) if not row]
        parts = [
            (with_videos, self(text=[text[i] for i in with_videos], videos=[videos[i] for i in with_videos], **kwargs)),
            (others, self(text=[text[i] for i in others], images=[images[i] for i in others], **kwargs)),
        ]
        visual = self.visual_input_names()
        side = kwargs.get("padding_side", self.padding_side)
        joined = {}
        for key in {key for _, batch in parts for key in batch}:
            values = [batch.get(key) for _, batch in parts]
            if key in visual:  # per_row: a part without any (text-only rows) gets one zero frame per row
                like = next(value for value in values if value is not None)
                values = [
                    like.new_zeros((len(rows), 1, *like.shape[2:])) if value is None else value
                    for (rows, _), value in zip(parts, values, strict=True)
                ]
                joined[key] = _pad_rows(values, 0, "right")
            else:  # the token sequences: input_ids, attention_mask
                joined[key] = _pad_rows(values, self.tokenizer.pad_token_id if key == "input_ids" else 0, side)
            joined[key] = joined[key][torch.tensor(with_videos + others).argsort()]
        return BatchFeature(joined)

    def frame_indices(self, metadata: Any, **kwargs: Any) -> Any:
        """Which frames of a video file the model sees: the family's video processor's own ``sample_frames`` with
        the spec's video.sampling (fps or num_frames), as transformers samples a video it decodes itself; the
        ``sample_indices_fn`` the collator decodes videos with (:func:`resonance.data.videos.load_row_videos`)."""
        if self.video is None:
            raise ValueError(f"{type(self).__name__} takes no video: {spec_file(type(self))} has no video: section")
        return self.hf.video_processor.sample_frames(metadata=metadata, **{**kwargs, **self.video.sampling()})

    def _adds_special_tokens(self, text: str) -> bool:
        """As transformers' apply_chat_template decides: no second BOS when the rendering starts with one."""
        bos = self.tokenizer.bos_token
        return not (bos is not None and text.startswith(bos))

    def _token_mask(self, text: str, spans: list[tuple[int, int]], add_special: bool) -> tuple[list[int], list[bool]]:
        """Tokenize the rendered text without image expansion; flag tokens overlapping a span."""
        encoded = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        flags = [any(e > s0 and s < e0 for s0, e0 in spans) and e > s for s, e in encoded["offset_mapping"]]
        return encoded["input_ids"], flags

    def process_batch_conv(
        self,
        conversations: list[list[Message]],
        images: list[list[Any]],
        first_supervised: list[int] | None = None,
        sources: list[str] | None = None,
        videos: list[list[LoadedVideo]] | None = None,
    ) -> BatchFeature:
        """Tokenize a batch of conversations (``videos``: each row's, decoded, in the order of its video parts);
        ``labels`` supervise the turns to learn only: assistant turns at
        index >= the row's ``first_supervised`` entry not marked ``train: False`` (:func:`supervised_turns`).

        The processor expands each image placeholder into the model's image tokens. To place the
        labels, the same rendering is tokenized once more without expansion (offsets mark the
        assistant spans) and aligned to the expanded ids: the two differ only inside image
        expansions, which are never supervised.

        Rows the family cannot take (:meth:`row_problem`) are one :class:`~resonance.errors.RowError` naming each
        by its ``sources`` entry (the collators pass each row's FILE:LINE), or as ``row N`` without.
        """
        first_supervised = first_supervised or [0] * len(conversations)
        self._check_rows(conversations, images, first_supervised, sources)
        if self.answer_as_suffix:
            return self._with_prefix_lm(self._process_with_suffix(conversations, images, first_supervised))
        supervised = [
            self.supervised_text(conv, first) for conv, first in zip(conversations, first_supervised, strict=True)
        ]
        texts = [text for text, _ in supervised]
        batch = self(text=texts, images=images, videos=videos)
        add_special = self._adds_special_tokens(texts[0])
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, (text, spans) in enumerate(supervised):
            plain_ids, flags = self._token_mask(text, spans, add_special)
            keep = batch["attention_mask"][row].bool()
            positions = keep.nonzero().flatten().tolist()
            expanded = batch["input_ids"][row, keep].tolist()
            matcher = difflib.SequenceMatcher(None, plain_ids, expanded, autojunk=False)
            for a, b, size in matcher.get_matching_blocks():
                for k in range(size):
                    if flags[a + k]:
                        pos = positions[b + k]
                        labels[row, pos] = batch["input_ids"][row, pos]
        labels[batch["input_ids"] == self.image_token_id] = IGNORE_INDEX
        if self.video_token_id is not None:
            labels[batch["input_ids"] == self.video_token_id] = IGNORE_INDEX
        batch["labels"] = labels
        self._from_prompts(batch, conversations, images, first_supervised)
        return self._with_prefix_lm(batch)

    def row_problem(self, messages: list[Message], image_count: int, first_supervised: int = 0) -> str | None:
        """Why this family cannot take a row, or None: images it cannot take (:class:`~resonance.data.images.
        ImageCount`; the processor would silently misplace them: InstructBLIP's puts query tokens in every row of
        a batch with images), or nothing to learn (every assistant turn to learn marked ``train: False``; for
        chat_template.answer: suffix, see :meth:`split_answer`)."""
        problem = ImageCount.for_family(self).problem(image_count)
        if problem is not None:
            return problem
        if (problem := self.video_problem(messages, image_count)) is not None:
            return problem
        if (problem := self.system_problem(messages)) is not None:
            return problem
        if self.answer_as_suffix:
            try:
                self.split_answer(messages, first_supervised)
            except ValueError as exc:
                return str(exc)
            return None
        answers = [i for i, m in enumerate(messages) if i >= first_supervised and m["role"] == "assistant"]
        if answers and not supervised_turns(messages, first_supervised):
            since = f" from index {first_supervised} on" if first_supervised else ""
            return (
                f"every assistant message{since} is marked train: false (indices {', '.join(map(str, answers))}, "
                "counting from 0), so the row has nothing to learn; let at least one train, or drop the row"
            )
        return None

    def video_problem(self, messages: list[Message], image_count: int = 0) -> str | None:
        """A video where the family takes none (no spec video section), or next to images where its processor takes
        one or the other (spec video.with_images: false), or where the answer goes to the processor as a suffix (not
        done for videos yet), or None."""
        count = video_parts(messages)
        if not count:
            return None
        if (problem := ImageCount.for_family(self).video_problem(count, image_count)) is not None:
            return problem
        if self.answer_as_suffix:
            return f"{count} video(s); the suffix answer path (spec chat_template.answer: suffix) takes no video yet"
        return None

    def system_problem(self, messages: list[Message]) -> str | None:
        """A system message where the family's template takes none (spec chat_template.system: false), or None."""
        if self.takes_system or not any(m["role"] == "system" for m in messages):
            return None
        return (
            f"a system message, which the {self.hf_processor_class} chat template does not take (spec "
            "chat_template.system: false); drop it, or put its text into the first user message"
        )

    def _check_rows(
        self,
        conversations: list[list[Message]],
        images: list[list[Any]],
        first_supervised: list[int],
        sources: list[str] | None,
    ) -> None:
        """Every row's :meth:`row_problem` at once, as one RowError (a DPO batch's halves name a row twice)."""
        names = sources or [f"row {row}" for row in range(len(conversations))]
        problems = {
            f"{name}: {problem}": None
            for name, messages, row_images, first in zip(names, conversations, images, first_supervised, strict=True)
            if (problem := self.row_problem(messages, len(row_images), first)) is not None
        }
        if problems:
            raise RowError("\n".join(problems))

    def _from_prompts(
        self, batch: BatchFeature, conversations: list[list[Message]], images: list[list[Any]], first: list[int]
    ) -> None:
        """Replace the image inputs of spec ``source: prompt`` with the processor's outputs for each row's prompt.

        A row's prompt is its turns before the first turn to learn (:func:`supervised_turns`), rendered with the
        generation prompt: what the processor is given at inference. So such inputs (InstructBLIP's Q-Former
        text, which conditions the image features every position sees) never hold an answer, and are the same
        for a DPO row's chosen and rejected halves.
        """
        names = [item.name for item in self.image_inputs if item.from_prompt]
        if not names or not any(images):
            return
        prompts = []
        for conv, start in zip(conversations, first, strict=True):
            answer = next(iter(supervised_turns(conv, start)), len(conv))
            prompts.append(self.render_conversation(conv[:answer], add_generation_prompt=True))
        from_prompts = self(text=prompts, images=images)
        for name in names:
            batch[name] = from_prompts[name]

    def split_answer(self, messages: list[Message], first_supervised: int) -> tuple[list[Message], str]:
        """chat_template.answer: suffix: the prompt's turns and the text of the last turn, the assistant's.

        Earlier assistant turns are prompt, whatever their ``train``; the last one must be a turn to learn
        (:func:`supervised_turns`): a ValueError otherwise."""
        last = len(messages) - 1
        if last < first_supervised or messages[last]["role"] != "assistant":
            roles = [m["role"] for m in messages]
            raise ValueError(
                f"{type(self).__name__}: the processor takes the answer as a suffix, so a conversation must end "
                f"with the assistant turn to learn; got roles {roles}"
            )
        if last not in supervised_turns(messages, first_supervised):
            raise ValueError(
                f"{type(self).__name__}: the processor learns only the last message (the answer, given as a "
                f"suffix), and it is marked train: false (index {last}, counting from 0), so the row has nothing to "
                "learn; let it train, or drop the row"
            )
        content = messages[last]["content"]
        if isinstance(content, str):
            return messages[:last], content
        return messages[:last], "".join(part["text"] or "" for part in content if part["type"] == "text")

    def _process_with_suffix(
        self, conversations: list[list[Message]], images: list[list[Any]], first_supervised: list[int]
    ) -> BatchFeature:
        """processor(text=prompts, suffix=answers): the processor places and labels each answer itself."""
        pairs = [self.split_answer(conv, first) for conv, first in zip(conversations, first_supervised, strict=True)]
        texts = [self.render_conversation(prompt, add_generation_prompt=True) for prompt, _ in pairs]
        batch = self(text=texts, images=images, suffix=[answer for _, answer in pairs])
        if "labels" not in batch:
            raise ValueError(
                f"{self.hf_processor_class} returned no labels for the suffix; spec chat_template.answer: suffix "
                "needs a processor that labels it (like PaliGemma's)"
            )
        labels = torch.as_tensor(batch["labels"]).clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        labels[batch["input_ids"] == self.image_token_id] = IGNORE_INDEX
        batch["labels"] = labels
        return batch

    def _with_prefix_lm(self, batch: BatchFeature) -> BatchFeature:
        """token_type_ids: prefix_lm: 0 before each row's first supervised token, 1 from it on, 0 on padding."""
        if self.prefix_lm:
            started = (batch["labels"] != IGNORE_INDEX).long().cumsum(dim=1) > 0
            batch["token_type_ids"] = (started & batch["attention_mask"].bool()).long()
        return batch

    # -- image inputs ----------------------------------------------------------------------------

    def image_input_names(self) -> list[str]:
        return [item.name for item in self.image_inputs]

    def video_input_names(self) -> list[str]:
        return [] if self.video is None else [item.name for item in self.video.inputs]

    def video_tokens_need_types(self) -> bool:
        """Whether videos expand into the image token yet have inputs of their own (spec video.token: image.token;
        GLM-4.1V), so that only mm_token_type_ids tell a video's tokens from an image's. Where the videos' frames
        join the images' inputs (InternVL) their tokens are image tokens to the model too: False."""
        if self.video is None or self.video_token_id != self.image_token_id:
            return False
        return any(name not in self.image_input_names() for name in self.video_input_names())

    def video_token_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        """Where a batch's tokens stand for video features: its video tokens; where they are image tokens too, those
        its mm_token_type_ids mark as a video's (2, transformers' value for video tokens)."""
        mask = batch["input_ids"] == self.video_token_id
        if self.video_tokens_need_types():
            mask &= torch.as_tensor(batch["mm_token_type_ids"]) == VIDEO_TOKEN_TYPE
        return mask

    def visual_input_names(self) -> list[str]:
        """The images' inputs that go to ``forward`` (spec image.inputs), then the videos' own (spec video.inputs
        not named as an image input: a shared one holds the videos' frames among the images')."""
        images = self.image_input_names()
        return images + [name for name in self.video_input_names() if name not in images]

    def first_half_images(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The image inputs of the first half of the rows (a DPO batch repeats them for rejected).

        per_patch inputs are cut where the grid says the first half's images end, per_frame ones where the frame
        counts say the first half's videos end; every other layout is halved, which is exact because the second half
        holds the same images (or tiles) again.
        """
        half: dict[str, torch.Tensor] = {}
        groups = [(self.image_inputs, self.image_grid_input, None)]
        if self.video is not None:
            groups.append((self.video.inputs, self.video.grid_input, self.video.frames_input))
        for items, grid_name, frames_name in groups:
            grid = inputs.get(grid_name) if grid_name else None
            frames = inputs.get(frames_name) if frames_name else None
            for item in items:
                if item.name not in inputs or item.name in half:  # a video input shared with the images: halved once
                    continue
                value = inputs[item.name]
                if item.layout == "per_patch":
                    count = grid.shape[0] // 2
                    half[item.name] = value[: int(grid[:count].prod(dim=-1).sum())]
                elif item.layout == "per_frame":
                    half[item.name] = value[: int(frames[: len(frames) // 2].sum())]
                else:
                    half[item.name] = value[: len(value) // 2]
        return half
