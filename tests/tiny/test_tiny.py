"""Tiny offline checkpoints (resonance.tiny): build, reload through the Auto classes, train one step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import yaml
from helpers import EXPECTED, FAMILIES, REPO
from PIL import Image
from safetensors.torch import load_file

from resonance.codegen.project import load_specs
from resonance.codegen.schema import ModelSpec
from resonance.tiny import TinyRecipe, build_tiny, tiny_from_spec


def expected(family: str) -> dict[str, Any]:
    """tests/expected/<family>.yaml: the real template's prompt and image-token counts per image size."""
    path = EXPECTED / f"{family}.yaml"
    assert path.is_file(), f"{path} is missing: every family in specs/ needs its expectations there"
    data = yaml.safe_load(path.read_text())
    sizes = {tuple(int(n) for n in key.split("x")): count for key, count in data["image_tokens"].items()}
    return {"prompt": data["prompt"], "image_tokens": sizes, "system_prompt": data.get("system_prompt")}


def model_spec(family: str) -> ModelSpec:
    ((_, loaded),) = load_specs([REPO / "specs" / f"{family}.yaml"], REPO)
    return loaded


def spec(family: str) -> TinyRecipe:
    """The ``tiny`` section of specs/<family>.yaml, as build_tiny takes it."""
    return tiny_from_spec(model_spec(family))


def image(size: tuple[int, int]) -> Image.Image:
    """A deterministic RGB test image of (width, height) ``size``, made in memory."""
    width, height = size
    pixels = bytes((x * 7 + y * 3 + c * 50) % 256 for y in range(height) for x in range(width) for c in range(3))
    return Image.frombytes("RGB", size, pixels)


SYSTEM = "You are a careful assistant."  # the system message of an expectation's system_prompt


def conversation(
    picture: Image.Image | None = None, answer: str | None = None, system: str | None = None
) -> list[dict[str, Any]]:
    image_part: dict[str, Any] = {"type": "image"} if picture is None else {"type": "image", "image": picture}
    messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": [image_part, {"type": "text", "text": "What is shown in this image?"}]})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def load(out_dir: Path) -> tuple[Any, Any]:
    processor = transformers.AutoProcessor.from_pretrained(out_dir)
    model = transformers.AutoModelForImageTextToText.from_pretrained(out_dir)
    return processor, model


@pytest.mark.parametrize("family", FAMILIES)
def test_build_reload_train_step(family: str, tmp_path: Path) -> None:
    tiny = spec(family)
    out_dir = build_tiny(tiny, tmp_path / family)
    assert out_dir == tmp_path / family
    # A checkpoint family without a chat template (PaliGemma: tiny chat_template null) saves none, like the real.
    saved_template = {"chat_template.jinja"} if tiny.chat_template is not None else set()
    assert {"config.json", "model.safetensors", "tokenizer.json", *saved_template} <= {
        p.name for p in out_dir.iterdir()
    }
    assert [p.name for p in tmp_path.iterdir()] == [family]  # no staging folder left behind

    processor, model = load(out_dir)
    tokenizer = processor.tokenizer
    assert type(model).__name__ == tiny.model_class
    assert type(processor).__name__ == tiny.processor_class
    # The spec names the PIL class (no torchvision here); with torchvision AutoProcessor loads the same
    # family's torchvision class from the saved folder.
    assert type(processor.image_processor).__name__.removesuffix("Pil") == tiny.image_processor_class.removesuffix(
        "Pil"
    )
    assert processor.chat_template == tokenizer.chat_template == tiny.chat_template

    # Config ids point at the trained tokenizer (filled after the processor added its tokens).
    config = model.config
    assert config.get_text_config(decoder=True).vocab_size == len(tokenizer)
    for path, token in tiny.tokenizer.config_token_ids.items():
        node = config
        for key in path.split("."):
            node = getattr(node, key)
        assert node == tokenizer.convert_tokens_to_ids(token), path
    image_token_id = config.image_token_id
    # Resonance relies on the spec's image.token: the model must scatter image features into it (Llama 4's
    # processor.image_token is <|image|>, one per image, while its features go to the <|patch|> tokens).
    assert image_token_id == tokenizer.convert_tokens_to_ids(model_spec(family).image.token)

    # Without a checkpoint template, conversations are rendered with the spec's inline one; a family whose
    # processor takes the answer as `suffix` (spec chat_template.answer) is given the prompt and the answer.
    family_spec = model_spec(family)
    template = None if tiny.chat_template is not None else family_spec.chat_template.template
    as_suffix = family_spec.chat_template.answer == "suffix"
    rendered = processor.apply_chat_template(conversation(), add_generation_prompt=True, chat_template=template)
    assert rendered == expected(family)["prompt"]
    if expected(family)["system_prompt"] is not None:  # with a system message (date-dependent: the tests pin it)
        with_system = conversation(system=SYSTEM)
        rendered = processor.apply_chat_template(with_system, add_generation_prompt=True, chat_template=template)
        assert rendered == expected(family)["system_prompt"]

    for size, count in expected(family)["image_tokens"].items():
        picture = image(size)
        answer = "A small colourful picture."
        messages = conversation(picture, answer=None if as_suffix else answer)
        suffix = {"suffix": answer} if as_suffix else {}
        render = {"add_generation_prompt": as_suffix, "chat_template": template}
        # (a copy: apply_chat_template adds its return_tensors to the processor_kwargs dict it is given)
        batch = processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs=dict(suffix), **render
        )
        # The same through processor(text=..., images=...): the template text already holds any bos.
        text = processor.apply_chat_template(messages, **render)
        has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
        direct = processor(text=text, images=[picture], return_tensors="pt", add_special_tokens=not has_bos, **suffix)
        assert torch.equal(batch["input_ids"], direct["input_ids"])

        input_ids = batch["input_ids"]
        assert (input_ids == image_token_id).sum().item() == count, size
        labels = batch.pop("labels", None)  # a suffix processor labels the answer itself
        if labels is None:
            labels = input_ids.masked_fill(input_ids == image_token_id, -100)
        assert (labels != -100).any()
        model.zero_grad()
        # floating inputs in the model's dtype, as Resonance's loads give the tower (Llama 4's pixel values are bf16)
        output = model(**batch.to(model.dtype), labels=labels)  # raises if image features and image tokens disagree
        assert torch.isfinite(output.loss)
        output.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
        # The LM head and the projector train; LLaVA skips the vision tower's last layer (feature layer -2).
        assert sum(g is not None for g in grads.values()) > len(grads) // 2
        # Through the module: with tied embeddings (Gemma) lm_head.weight is listed once, as embed_tokens.weight.
        assert model.get_output_embeddings().weight.grad is not None
        projector = model_spec(family).modules.projector
        if projector is not None:
            assert any(g is not None for name, g in grads.items() if name.startswith(projector + "."))


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_bytes(family: str, tmp_path: Path) -> None:
    tiny = spec(family)
    first = build_tiny(tiny, tmp_path / "a", seed=3)
    second = build_tiny(tiny, tmp_path / "b", seed=3)
    other = build_tiny(tiny, tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    weights, other_weights = load_file(first / "model.safetensors"), load_file(other / "model.safetensors")
    assert weights.keys() == other_weights.keys()
    assert any(not torch.equal(weights[key], other_weights[key]) for key in weights)


def test_existing_out_dir(tmp_path: Path) -> None:
    tiny = spec("llava")
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    build_tiny(tiny, out_dir)  # an empty folder is fine
    with pytest.raises(FileExistsError):
        build_tiny(tiny, out_dir)
    marker = out_dir / "keep.txt"
    marker.write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny(tiny, out_dir)
    assert marker.read_text() == "mine"
    build_tiny(tiny, out_dir, overwrite=True)
    assert not marker.exists() and (out_dir / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    tiny = spec("llava").model_copy(update={"model_class": "NoSuchModelForConditionalGeneration"})
    with pytest.raises(ValueError, match="NoSuchModel"):
        build_tiny(tiny, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["qwen2_vl", "smolvlm"])
def test_video_processor_saved_and_loaded(family: str, tmp_path: Path) -> None:
    """A processor with a video processor (optional in Qwen2-VL's, required in SmolVLM's) is built with the
    family's default one, and plain AutoProcessor saves and loads it: what a trainer does at checkpoint time."""
    out_dir = build_tiny(spec(family), tmp_path / family)
    processor = transformers.AutoProcessor.from_pretrained(out_dir)
    mapped = transformers.models.auto.video_processing_auto.VIDEO_PROCESSOR_MAPPING_NAMES
    model_type = transformers.AutoConfig.from_pretrained(out_dir).model_type
    assert type(processor.video_processor).__name__ == mapped[model_type]["torchvision"]
    processor.save_pretrained(tmp_path / "again")
    again = transformers.AutoProcessor.from_pretrained(tmp_path / "again")
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()
    assert again.video_processor.to_dict() == processor.video_processor.to_dict()
