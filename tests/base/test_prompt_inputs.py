"""InstructBLIP's mechanisms: image inputs computed from the prompt only (spec image.inputs source: prompt),
refused image counts (image.multi_image / image.required), and TRL's fused LM head on a model without a
backbone module (resonance.patches.fused_head.fused_head_backbone)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import IMAGE, REPO, assistant, hf_batch, load_adapter, load_hf_processor, make_image, to_hf, user
from trl.trainer.utils import add_fused_lm_head

from resonance.patches.fused_head import fused_head_backbone

CONVERSATION = [
    user(IMAGE, "What is shown in this image?"),
    assistant("A small house."),
    user("What color is the car?"),
    assistant("Blue."),
]


def _qformer_text(processor, ids: torch.Tensor) -> str:
    return processor.hf.qformer_tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def test_qformer_text_is_the_prompt_without_answers(tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint("instructblip")
    _, processor = load_adapter(ckpt)
    assert {item.name for item in processor.image_inputs if item.from_prompt} == {
        "qformer_input_ids",
        "qformer_attention_mask",
    }
    image = make_image(40, 30)
    batch = processor.process_batch_conv([CONVERSATION], [[image]])
    # The HF processor on the whole conversation gives the Q-Former the answers too ...
    whole = hf_batch(load_hf_processor(ckpt), [to_hf(CONVERSATION, [image])])
    assert "house" in _qformer_text(processor, whole["qformer_input_ids"][0])
    # ... ours only the turns before the first answer, as at inference, while input_ids are the whole.
    assert _qformer_text(processor, batch["qformer_input_ids"][0]) == "what is shown in this image?"
    assert torch.equal(batch["input_ids"], whole["input_ids"])

    # DPO: the prompt holds earlier answers; chosen and rejected rows get the same Q-Former text (the trainer
    # encodes the images once for both), which holds the prompt's turns but no completion.
    prompt = CONVERSATION[:3]
    dpo = processor.process_batch_conv(
        [prompt + [assistant("Blue.")], prompt + [assistant("Red, I think.")]], [[image], [image]], [3, 3]
    )
    assert torch.equal(dpo["qformer_input_ids"][0], dpo["qformer_input_ids"][1])
    text = _qformer_text(processor, dpo["qformer_input_ids"][0])
    assert "house" in text and "car" in text and "blue" not in text and "red" not in text


def test_refused_image_counts(tiny_checkpoint: Callable[[str], Path]) -> None:
    _, processor = load_adapter(tiny_checkpoint("instructblip"))
    assert not processor.multi_image and processor.images_required
    two = [user(IMAGE, IMAGE, "Which one?"), assistant("The first.")]
    with pytest.raises(ValueError, match="row 0: 2 images"):
        processor.process_batch_conv([two], [[make_image(32, 32), make_image(40, 30)]])
    text_only = [user("Yes or no?"), assistant("Yes.")]
    with pytest.raises(ValueError, match=r"row 1: 0 image\(s\), but this model family needs at least 1"):
        processor.process_batch_conv([CONVERSATION, text_only], [[make_image(32, 32)], []])


def test_generated_adapters_mark_prompt_inputs_only_where_set() -> None:
    generated = REPO / "generated"
    assert (
        'ImageInput("qformer_input_ids", "per_row", from_prompt=True)'
        in (generated / "instructblip" / "__init__.py").read_text()
    )
    assert "from_prompt" not in (generated / "llava" / "__init__.py").read_text()


def test_fused_head_runs_without_a_backbone_module(tiny_checkpoint: Callable[[str], Path]) -> None:
    """TRL's fused log-probs on InstructBLIP equal log_softmax of its own logits, one forward per call."""
    ckpt = tiny_checkpoint("instructblip")
    mapper, processor = load_adapter(ckpt)
    model = mapper.model.from_pretrained(ckpt).eval()
    assert model.base_model is model  # no backbone attribute: what TRL's fused head cannot handle alone
    batch = processor.process_batch_conv([CONVERSATION], [[make_image(40, 30)]])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    add_fused_lm_head(model)
    with pytest.raises(AttributeError, match="last_hidden_state"), torch.no_grad():
        model(**batch, labels=labels, fused_lm_head=True)
    fused_head_backbone(model)
    fused_head_backbone(model)  # idempotent
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            fused = model(**batch, labels=labels, fused_lm_head=True)
    finally:
        handle.remove()
    assert calls == [1]
    mask = labels[:, 1:] != -100
    expected = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])
    torch.testing.assert_close(fused.log_probs[mask], expected[..., 0][mask], rtol=1e-5, atol=1e-5)
    assert model.base_model is model and model.get_output_embeddings() is model.language_model.lm_head
    with torch.no_grad():  # and the plain forward is unchanged
        torch.testing.assert_close(model(**batch).logits, logits, rtol=0, atol=0)


def test_fused_head_backbone_leaves_models_with_a_backbone_alone(tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint("llava")
    mapper, _ = load_adapter(ckpt)
    model = mapper.model.from_pretrained(ckpt)
    add_fused_lm_head(model)
    forward = model.forward
    fused_head_backbone(model)
    assert model.forward is forward
