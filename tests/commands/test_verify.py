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
    assert result.stdout.count(" ok ") == 10
    assert "warning" not in result.stdout + result.stderr


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
    assert result.stdout.count("skipped") == 7  # the checks that need the processor did not run


def test_verify_warns_of_a_degenerate_tiny_configuration(project: Path) -> None:
    spec = project / "specs" / "llava.yaml"
    text = spec.read_text()
    assert "\n  parameters:" not in text
    # a head of zeros: every logit 0, at every position
    text = text.replace("\n  tokenizer:", '\n  parameters: {"lm_head.weight": 0.0}\n  tokenizer:', 1)
    spec.write_text(text)
    result = runner.invoke(app, ["verify", str(spec), "--project", str(project)])
    assert result.exit_code == 0, result.stdout + result.stderr  # warnings, not failures
    assert "every check passed (with warnings)" in result.stderr
    tiny_line = _line_of(text, "tiny:")
    warnings = [line for line in result.stderr.splitlines() if ": tiny: warning: " in line]
    assert len(warnings) == 2 and all(line.startswith(f"specs/llava.yaml:{tiny_line}:") for line in warnings)
    assert "near-uniform logits at the answers (spread 0 " in warnings[0]
    assert "the logits hardly change from one answer token to the next" in warnings[1]


def test_verify_names_targets_peft_left_without_lora(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # peft 0.21 rewrites the targets of some mixture-of-experts model types (glm4v_moe: the MLP targets go);
    # emulated on LLaVA by a conversion that keeps only the attention's
    from peft.utils import transformers_weight_conversion as conversion

    def attention_only(config, **_: object) -> None:
        config.target_modules = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj)"

    monkeypatch.setattr(conversion, "convert_peft_config_for_transformers", attention_only)
    result = runner.invoke(app, ["verify", str(project / "specs" / "llava.yaml"), "--project", str(project)])
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "lora.targets: peft put no LoRA layer on ['model.language_model.layers.0.mlp.gate_proj'" in result.stderr


def test_degenerate_reads_flat_logits_and_equal_rows() -> None:
    import torch

    from resonance.commands.verify import degenerate

    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, 8, 9]])
    batch = {"labels": labels, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    varied = torch.randn(2, 4, 50, generator=torch.Generator().manual_seed(0))
    assert degenerate(varied, batch) == []
    assert len(degenerate(varied * 1e-3, batch)) == 2  # near-uniform, and alike from token to token
    same_everywhere = varied[:1, :1].expand(2, 4, 50)
    (alike,) = degenerate(same_everywhere, batch)
    assert "hardly change" in alike
    (equal,) = degenerate(varied, {**batch, "attention_mask": torch.ones(2, 4)})
    assert "collate to the same length (4 tokens)" in equal


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
