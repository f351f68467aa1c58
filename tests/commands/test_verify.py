"""A spec that does not fit its model: `resonance verify SPEC`, and the same checks at first use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import make_image
from typer.testing import CliRunner

from resonance.base.processor import ImageInput
from resonance.base.registry import load_core_mapper
from resonance.cli import app
from resonance.errors import SpecMismatchError

runner = CliRunner()


def _line_of(text: str, needle: str) -> int:
    return text.splitlines().index(next(line for line in text.splitlines() if needle in line)) + 1


def test_verify_passes_on_a_good_spec(project: Path) -> None:
    result = runner.invoke(app, ["verify", str(project / "specs" / "llava.yaml"), "--project", str(project)])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "every check passed" in result.stderr
    assert result.stdout.count(" ok ") == 8


def test_verify_names_every_bad_field_with_its_line(project: Path) -> None:
    spec = project / "specs" / "llava.yaml"
    text = spec.read_text()
    text = text.replace("vision_tower: model.vision_tower", "vision_tower: model.vision_towr")
    text = text.replace("targets: [q_proj, k_proj, v_proj, o_proj", "targets: [q_proj, k_proj, qkv_proj, o_proj")
    text = re.sub(r"\n  token: \"<image>\"", '\n  token: "<img>"', text)
    assert text.count("model.vision_towr") == 1 and "qkv_proj" in text and '"<img>"' in text
    spec.write_text(text)

    result = runner.invoke(app, ["verify", str(spec), "--project", str(project)])
    assert result.exit_code == 1, result.stdout + result.stderr
    errors = result.stderr
    line = _line_of(text, "model.vision_towr")
    assert f"specs/llava.yaml:{line}:" in errors
    assert "modules.vision_tower: LlavaForConditionalGeneration has no submodule 'model.vision_towr'" in errors
    assert "did you mean 'model.vision_tower'" in errors
    assert "lora.targets.2: 'qkv_proj' is no linear layer under model.language_model" in errors
    token_line = _line_of(text, 'token: "<img>"')
    assert f"specs/llava.yaml:{token_line}:" in errors
    assert "image.token: '<img>' is not a token of the tokenizer; did you mean '<image>'" in errors
    assert result.stdout.count("FAILED") == 2  # model and processor checks
    assert result.stdout.count("skipped") == 5  # the checks that need the processor did not run


def test_first_use_of_a_bad_module_path_names_the_field(tiny_checkpoint) -> None:
    mapper = load_core_mapper(tiny_checkpoint("llava"))

    class Broken(mapper.model):
        projector_path = "model.projector"

    Broken.__module__ = mapper.model.__module__
    with pytest.raises(SpecMismatchError) as info:
        Broken.from_pretrained(tiny_checkpoint("llava"))
    message = str(info.value)
    assert "specs/llava.yaml: modules.projector: LlavaForConditionalGeneration has no submodule" in message
    assert "did you mean 'model.multi_modal_projector'" in message


def test_first_batch_without_a_declared_image_input_names_the_field(tiny_checkpoint) -> None:
    mapper = load_core_mapper(tiny_checkpoint("llava"))

    class Broken(mapper.processor):
        image_inputs = [*mapper.processor.image_inputs, ImageInput("image_sizes", "per_image")]

    Broken.__module__ = mapper.processor.__module__
    processor = Broken(tiny_checkpoint("llava"))
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    processor.process_batch_conv([text_only], [[]])  # no images: nothing to check yet
    with_image = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(SpecMismatchError) as info:
        processor.process_batch_conv([with_image], [[make_image(32, 32)]])
    message = str(info.value)
    assert "specs/llava.yaml: image.inputs.1.name: the processor produced no 'image_sizes'" in message
    assert "'pixel_values'" in message  # what it did produce
