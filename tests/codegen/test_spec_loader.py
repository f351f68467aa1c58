"""The spec loader: valid specs load; every kind of mistake names file:line:col and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO
from typer.testing import CliRunner

from resonance.cli import app
from resonance.codegen.loader import load_spec
from resonance.codegen.schema import ModelSpec
from resonance.errors import SpecError


def _break(project: Path, old: str, new: str, name: str = "llava") -> Path:
    path = project / "specs" / f"{name}.yaml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_repository_specs_load() -> None:
    for path in sorted((REPO / "specs").glob("*.yaml")):
        spec = load_spec(path)
        assert isinstance(spec, ModelSpec) and spec.name == path.stem


@pytest.mark.parametrize(
    ("old", "new", "field", "needle", "col", "message"),
    [
        (
            "flash_attention: true",
            "flash_attention: maybe",
            "flash_attention",
            "flash_attention:",
            18,
            "bool",
        ),
        (
            "  projector: model.multi_modal_projector",
            "  projektor: x",
            "modules.projektor",
            "projektor",
            3,
            "did you mean 'projector'?",
        ),
        ("model_class: LlavaForConditionalGeneration\n", "", "model_class", "name: llava", 1, "missing"),
        ("name: llava", "name: Llava", "name", "name: Llava", 7, "lower case"),
        ("name: llava", "name: os; import sys", "name", "name: os", 7, "not a Python identifier"),
        (
            "  vision_tower: model.vision_tower",
            "  vision_tower: model..vision_tower",
            "modules.vision_tower",
            "vision_tower: model..",
            17,
            "dotted path",
        ),
        ("  targets: [q_proj,", "  targets: [q-proj,", "lora.targets.0", "targets:", 13, "identifier"),
        (
            'transformers: ">=5.20,<6"',
            'transformers: "\\"\\"\\" import os"',
            "transformers",
            "transformers:",
            15,
            "version range",
        ),
    ],
)
def test_invalid_spec_names_file_line_col(project: Path, old, new, field, needle, col, message) -> None:
    path = _break(project, old, new)
    with pytest.raises(SpecError) as info:
        load_spec(path, display="specs/llava.yaml")
    problem = next(p for p in info.value.problems if p.field == field)
    assert problem.line == _line_of(path, needle)
    assert problem.col == col
    assert message in problem.message
    assert str(problem).startswith(f"specs/llava.yaml:{problem.line}:{col}: {field}: ")


def test_all_problems_reported_at_once(project: Path) -> None:
    _break(project, "flash_attention: true", "flash_attention: maybe")
    path = _break(project, "position_ids: 1d", "position_ids: 4d")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert {p.field for p in info.value.problems} == {"flash_attention", "position_ids"}


def test_yaml_syntax_and_duplicate_keys(project: Path) -> None:
    path = _break(project, "flash_attention: true", "flash_attention: true\nflash_attention: false")
    with pytest.raises(SpecError, match=r"llava.yaml:\d+:1: flash_attention: duplicate key 'flash_attention'"):
        load_spec(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(path)


def test_name_must_match_file(project: Path) -> None:
    path = project / "specs" / "llava.yaml"
    renamed = project / "specs" / "llava2.yaml"
    path.rename(renamed)
    with pytest.raises(SpecError, match="must match the file name 'llava2'"):
        load_spec(renamed)


def test_cli_exit_2_on_invalid_spec(project: Path) -> None:
    _break(project, "flash_attention: true", "flash_attention: maybe")
    result = CliRunner().invoke(app, ["check", "--project", str(project)])
    assert result.exit_code == 2
    assert "specs/llava.yaml:" in result.stderr and "flash_attention:" in result.stderr


def test_schema_command_prints_json_schema() -> None:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["additionalProperties"] is False
    assert {"name", "modules", "lora", "image", "tiny"} <= set(schema["properties"])


# -- the tiny section: typed like the rest of the spec, so its problems name file:line:col too --------------


@pytest.mark.parametrize(
    ("name", "old", "new", "field", "needle", "col", "message"),
    [
        (
            "llava",
            "    add_bos_token: true",
            "    add_bos_tokn: true",
            "tiny.tokenizer.add_bos_tokn",
            "add_bos_tokn:",
            5,
            "unknown key 'add_bos_tokn'; did you mean 'add_bos_token'? (allowed: vocab_size, special_tokens,",
        ),
        (
            "llava",
            "    vocab_size: 400",
            '    vocab_size: "many"',
            "tiny.tokenizer.vocab_size",
            'vocab_size: "many"',
            17,
            "valid integer",
        ),
        (
            "llava",
            "    vocab_size: 400",
            "    vocab_size: 0",
            "tiny.tokenizer.vocab_size",
            "vocab_size: 0",
            17,
            "greater than 0",
        ),
        (
            "llava",
            '    special_tokens: ["<image>"]',
            '    special_tokens: ["<image>", ""]',
            "tiny.tokenizer.special_tokens.1",
            "special_tokens:",
            33,
            "at least 1 character",
        ),
        (
            "llava",
            '      text_config.pad_token_id: "<pad>"',
            '      text_config..pad_token_id: "<pad>"',
            "tiny.tokenizer.config_token_ids.text_config..pad_token_id",
            "text_config..pad_token_id",
            7,
            "not a dotted path",
        ),
        (
            "llava",
            "  image_processor:\n",
            "  image_processer:\n",
            "tiny.image_processer",
            "image_processer:",
            3,
            "did you mean 'image_processor'?",
        ),
        (
            "llava",
            "    image_seq_length: 16",
            "    image-seq-length: 16",
            "tiny.config.image-seq-length",
            "image-seq-length:",
            5,
            "not a Python identifier",
        ),
        (  # a free-form value below a free-form mapping: pydantic's own path parts (dict, list) are no keys
            "llava",
            "      max_position_embeddings: 512",
            "      max_position_embeddings: 2024-01-01",
            "tiny.config.text_config.max_position_embeddings",
            "max_position_embeddings:",
            32,
            "is not JSON data",
        ),
        (
            "llava",
            "      hidden_size: 64",
            "      7: 64",
            "tiny.config.text_config.7",
            "      7: 64",
            7,
            "key 7 is not a string",
        ),
        (
            "llava",
            "    num_additional_image_tokens: 1",
            "    tokenizer: 1",
            "tiny.processor.tokenizer",
            "    tokenizer: 1",
            5,
            "'tokenizer' is built from tiny.tokenizer",
        ),
        (
            "instructblip",
            '      cls_token: "[CLS]"',
            '      cls_tokn: "[CLS]"',
            "tiny.extra_tokenizers.qformer_tokenizer.cls_tokn",
            "cls_tokn:",
            7,
            "did you mean 'cls_token'?",
        ),
        (
            "instructblip",
            "      kind: wordpiece",
            "      kind: unigram",
            "tiny.extra_tokenizers.qformer_tokenizer.kind",
            "kind: unigram",
            13,
            "'wordpiece', 'bpe'",
        ),
        (
            "instructblip",
            "      kind: wordpiece\n",
            "",
            "tiny.extra_tokenizers.qformer_tokenizer.kind",
            "qformer_tokenizer:",
            5,
            "required field is missing",
        ),
        (
            "instructblip",
            "      config_vocab_size: qformer_config.vocab_size",
            "      config_vocab_size: qformer_config.vocab size",
            "tiny.extra_tokenizers.qformer_tokenizer.config_vocab_size",
            "config_vocab_size:",
            26,
            "not a dotted path",
        ),
    ],
)
def test_invalid_tiny_names_file_line_col(project: Path, name, old, new, field, needle, col, message) -> None:
    path = _break(project, old, new, name)
    with pytest.raises(SpecError) as info:
        load_spec(path, display=f"specs/{name}.yaml")
    assert [p.field for p in info.value.problems] == [field]
    (problem,) = info.value.problems
    line = _line_of(path, needle)
    assert (problem.line, problem.col) == (line, col)
    assert message in problem.message
    assert str(problem) == f"specs/{name}.yaml:{line}:{col}: {field}: {problem.message}"


def test_unknown_tokenizer_key_message(project: Path) -> None:
    """The whole line a user sees for a typo inside tiny.tokenizer."""
    path = _break(project, '    pad_token: "<pad>"', '    pad_tokens: "<pad>"')
    with pytest.raises(SpecError) as info:
        load_spec(path, display="specs/llava.yaml")
    line = _line_of(path, "pad_tokens:")
    assert str(info.value) == (
        f"specs/llava.yaml:{line}:5: tiny.tokenizer.pad_tokens: unknown key 'pad_tokens'; did you mean 'pad_token'? "
        "(allowed: vocab_size, special_tokens, named_special_tokens, bos_token, eos_token, pad_token, unk_token, "
        "add_bos_token, add_eos_token, config_token_ids, pre_tokenizer_pattern)"
    )


def test_extra_tokenizer_keys_follow_its_kind(project: Path) -> None:
    """A bpe extra tokenizer takes tiny.tokenizer's keys: the wordpiece-only ones are unknown, each at its line."""
    path = _break(project, "      kind: wordpiece", "      kind: bpe", "instructblip")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    prefix = "tiny.extra_tokenizers.qformer_tokenizer."
    assert [p.field for p in info.value.problems] == [
        f"{prefix}{key}" for key in ("cls_token", "sep_token", "mask_token")
    ]
    for problem in info.value.problems:
        assert problem.line == _line_of(path, problem.field.removeprefix(prefix) + ":")
        assert "pre_tokenizer_pattern" in problem.message  # the keys allowed for kind bpe


def test_all_tiny_problems_reported_at_once(project: Path) -> None:
    _break(project, "    image_seq_length: 16", "    image-seq-length: 16")
    _break(project, "    vocab_size: 400", '    vocab_size: "many"')
    _break(project, "    add_bos_token: true", "    add_bos_tokn: true")
    path = _break(project, "flash_attention: true", "flash_attention: maybe")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    problems = info.value.problems
    assert [p.field for p in problems] == [
        "flash_attention",
        "tiny.config.image-seq-length",
        "tiny.tokenizer.vocab_size",
        "tiny.tokenizer.add_bos_tokn",
    ]
    needles = ["flash_attention: maybe", "image-seq-length:", "vocab_size:", "add_bos_tokn:"]
    assert [p.line for p in problems] == [_line_of(path, needle) for needle in needles]


def test_schema_describes_every_tiny_field() -> None:
    """`resonance schema` documents the tiny section: every property of its models has a description."""
    definitions = ModelSpec.model_json_schema()["$defs"]
    models = ["Tiny", "TinyTokenizer", "WordpieceTokenizer", "BpeExtraTokenizer"]
    undocumented = [
        f"{model}.{name}"
        for model in models
        for name, prop in definitions[model]["properties"].items()
        if not prop.get("description")
    ]
    assert undocumented == []
    assert definitions["Tiny"]["additionalProperties"] is False


@pytest.mark.parametrize(
    ("frames_input", "message"),
    [
        (None, "frames_input: required when an input has layout per_frame"),
        ("pixel_values_videos", "frames_input: 'pixel_values_videos' must be one of the per_video inputs"),
    ],
)
def test_per_frame_video_inputs_need_their_frame_counts(frames_input: str | None, message: str) -> None:
    """Inputs laid out per frame of all videos (Gemma 4's) are sized by a per_video input of frame counts."""
    from pydantic import ValidationError

    from resonance.codegen.schema import Video

    inputs = [
        {"name": "pixel_values_videos", "layout": "per_frame"},
        {"name": "num_frames_per_video", "layout": "per_video"},
    ]
    with pytest.raises(ValidationError, match=message):
        Video(token="<|video|>", inputs=inputs, frames_input=frames_input)
    assert Video(token="<|video|>", inputs=inputs, frames_input="num_frames_per_video").frames_input


@pytest.mark.parametrize(
    ("name", "old", "new", "field", "message"),
    [
        (
            "internvl",
            "    - {name: pixel_values, layout: per_tile}\n  # 8 frames",
            "    - {name: pixel_values, layout: per_video}\n  # 8 frames",
            "",  # a check across sections: the message names the field
            "video.inputs.0: 'pixel_values' is an image input too (the processor puts the videos' frames among the "
            "images'), so its layout is the image input's, per_tile; got per_video",
        ),
        (
            "llava_onevision",
            "sampling: {num_frames: 8, equal_frames: true}",
            "sampling: {fps: 1.0, equal_frames: true}",
            "video.sampling",
            "equal_frames: needs num_frames, the number of frames every video reaches the processor with",
        ),
        (
            "internvl",
            "  sampling: {num_frames: 8, equal_frames: true}",
            "  sampling: {num_frames: 8, equal_frames: true}\n  with_images: false",
            "",
            "video.with_images: false joins a batch's image rows and video rows row by row, so every image and video "
            "input must be laid out per_row; got ['per_tile']",
        ),
        (
            "qwen3_5",
            "  sampling: {fps: 2.0}",
            "  sampling: {fps: 2.0}\n  chat_template: '{{ messages }}'",
            "",
            "video.chat_template: not with chat_template.training: trl",
        ),
    ],
)
def test_invalid_video_sections_are_named(project: Path, name, old, new, field, message) -> None:
    path = _break(project, old, new, name)
    with pytest.raises(SpecError) as info:
        load_spec(path, display=f"specs/{name}.yaml")
    (problem,) = info.value.problems
    assert problem.field == field and message in problem.message, str(problem)
