"""Answers given to the processor as a suffix, prefix-LM token_type_ids, and image-less rows refused.

For the families whose spec says ``chat_template.answer: suffix`` (PaliGemma) the reference is the family's
own HF processor called the way its documentation trains it::

    processor(text=prompts, suffix=answers, images=images, padding=True, padding_side="right", return_tensors="pt")

Each prompt is the conversation before its last turn (the assistant's), rendered by HF's ``apply_chat_template``
with the generation prompt and the spec's inline template (the checkpoints ship none); the answer is that last
turn's text. The processor places <bos>, the prefix's "\\n" and the answer's <eos> itself and returns
token_type_ids (0: prefix, 1: suffix) and labels (the suffix). Ours: ``core_mapper.processor(ckpt)`` and the
collators, which must give the same tensors bit for bit.

For ``token_type_ids: prefix_lm`` families the model is checked too: no position sees a later supervised token
(the label-leak a prefix holding the answer would cause), and ``generate`` continues the prompt causally.
The schema and compiler parts of the three spec fields (``chat_template.answer``, ``token_type_ids``,
``image.required``) are checked on a scratch copy of the llava spec.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    FAMILIES,
    IGNORE_INDEX,
    IMAGE,
    PARITY_CASES,
    REPO,
    SFT_CASES,
    SUFFIX_FAMILIES,
    Message,
    assistant,
    load_adapter,
    load_hf_processor,
    make_image,
    open_rgb,
    our_inference_batch,
    preference_rows,
    read_spec,
    row_images,
    sft_rows,
    to_hf,
    user,
)
from pydantic import ValidationError

from resonance import codegen
from resonance.codegen.schema import ModelSpec
from resonance.commands.verify import verify
from resonance.errors import RowError

PREFIX_LM_FAMILIES = [f for f in FAMILIES if read_spec(f).get("token_type_ids") == "prefix_lm"]
IMAGES_REQUIRED_FAMILIES = [f for f in FAMILIES if (read_spec(f).get("image") or {}).get("required")]


def _template(family: str) -> str | None:
    """The spec's inline template, or None to use the checkpoint's own."""
    chat_template = read_spec(family).get("chat_template") or {}
    return chat_template.get("template") if chat_template.get("source") == "inline" else None


def _answer_text(message: Message) -> str:
    assert message["role"] == "assistant", "test bug: the last turn must be the answer"
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def _reference(
    hf: Any, template: str | None, rows: list[tuple[list[Message], list[Any]]], padding_side: str = "right"
) -> Any:
    """processor(text=prompts, suffix=answers, images=...): HF only (its renderer, its processor)."""
    prompts = [
        hf.apply_chat_template(to_hf(messages[:-1], images), chat_template=template, add_generation_prompt=True)
        for messages, images in rows
    ]
    answers = [_answer_text(messages[-1]) for messages, _ in rows]
    images = [list(images) for _, images in rows]
    return hf(text=prompts, suffix=answers, images=images, padding=True, padding_side=padding_side, return_tensors="pt")


def _check_suffix_row(hf: Any, batch: Any, row: int, answer: str) -> None:
    """Labels are exactly the answer and <eos>; token_type_ids are 1 from the answer's first token to the end."""
    labels, mask = batch["labels"][row], batch["attention_mask"][row].bool()
    supervised = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert supervised, "no supervised token"
    assert supervised == list(range(supervised[0], supervised[-1] + 1)), "the answer is not one span"
    assert supervised[-1] == int(mask.nonzero().max()), "the answer does not end the row"
    assert hf.tokenizer.decode(batch["input_ids"][row, supervised]) == answer + hf.tokenizer.eos_token
    expected = torch.zeros_like(labels)
    expected[supervised[0] : supervised[-1] + 1] = 1
    assert batch["token_type_ids"][row].tolist() == expected.tolist()


def _without_imageless(processor: Any, rows: list[tuple[list[Message], list[Any]]]) -> list:
    # An image-less row cannot go through such a processor (test_rows_without_images_are_refused).
    return [row for row in rows if row[1]] if processor.images_required else rows


@pytest.mark.parametrize("case", list(PARITY_CASES))
@pytest.mark.parametrize("family", SUFFIX_FAMILIES)
def test_batch_equals_processor_with_suffix(family: str, case: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    _, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    rows = _without_imageless(processor, PARITY_CASES[case]())

    ours = processor.process_batch_conv([m for m, _ in rows], [list(images) for _, images in rows])
    reference = _reference(hf, _template(family), rows)

    assert {"input_ids", "attention_mask", "token_type_ids", "labels"} <= set(reference.keys())
    assert set(reference.keys()) <= set(ours.keys())
    for key, expected in reference.items():
        assert ours[key].dtype == expected.dtype, key
        assert torch.equal(ours[key], expected), f"{key} differs from processor(text=prompt, suffix=answer)"
    for name in processor.image_input_names():
        assert name in reference and name in ours, name
    for row, (messages, _) in enumerate(rows):
        _check_suffix_row(hf, ours, row, _answer_text(messages[-1]))
    assert not (ours["labels"] == processor.image_token_id).any()


@pytest.mark.parametrize("case", list(SFT_CASES))
@pytest.mark.parametrize("family", SUFFIX_FAMILIES)
def test_sft_collator_labels(family: str, case: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Through the SFT collator (images from files): only the last answer and its <eos> are labelled."""
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    cases = [(messages, sizes) for messages, sizes in SFT_CASES[case] if sizes or not processor.images_required]
    rows = sft_rows(tmp_path, cases)

    batch = mapper.sft_collator(processor)(rows)
    reference = _reference(hf, _template(family), [(r["messages"], [open_rgb(p) for p in r["images"]]) for r in rows])
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(batch[key], reference[key]), key
    for i, row in enumerate(rows):
        _check_suffix_row(hf, batch, i, _answer_text(row["messages"][-1]))
        # Earlier answers of a multi-turn row are prompt: in the bidirectional prefix, never labelled.
        for earlier in [m for m in row["messages"][:-1] if m["role"] == "assistant"]:
            assert _answer_text(earlier) not in hf.tokenizer.decode(batch["input_ids"][i][batch["labels"][i] >= 0])


@pytest.mark.parametrize("family", SUFFIX_FAMILIES)
def test_dpo_batch_equals_processor_with_suffix(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """Chosen and rejected rows are processor(text=prompt, suffix=chosen / rejected); completion_mask its labels."""
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    hf = load_hf_processor(ckpt)
    rows = preference_rows(tmp_path, processor.images_required)
    batch = mapper.dpo_collator(processor)(rows)

    pairs = []
    for answer in ("chosen", "rejected"):
        pairs += [(r["prompt"] + r[answer], [open_rgb(p) for p in r["images"]]) for r in rows]
    reference = _reference(hf, _template(family), pairs)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], reference[key]), key
    assert torch.equal(batch["completion_mask"], (reference["labels"] != IGNORE_INDEX).long())
    batch["labels"] = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    for i, (messages, _) in enumerate(pairs):
        _check_suffix_row(hf, batch, i, _answer_text(messages[-1]))
    chosen = _reference(hf, _template(family), pairs[: len(rows)])
    for name in processor.image_input_names():  # the prompts' images once: the chosen half
        assert torch.equal(batch[name], chosen[name]), name


@pytest.mark.parametrize("family", SUFFIX_FAMILIES)
def test_inference_prompts_equal_processor(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Inference: the prompt alone (all prefix, token_type_ids 0), left-padded, as processor(text=prompt)."""
    processor, hf, rows, ours = our_inference_batch(tiny_checkpoint(family))
    prompts = [
        hf.apply_chat_template(to_hf(m, images), chat_template=_template(family), add_generation_prompt=True)
        for m, images in rows
    ]
    images = [list(images) for _, images in rows]
    reference = hf(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
    for key, expected in reference.items():
        assert torch.equal(ours[key], expected), key
    assert not ours["token_type_ids"].any()
    mask = ours["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all(), "not left-padded"


@pytest.mark.parametrize("family", IMAGES_REQUIRED_FAMILIES)
def test_rows_without_images_are_refused(family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """image.required: an image-less row is an error naming the row (the processor would misplace <bos>)."""
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    text_only = {"messages": [user("Yes or no?"), assistant("Yes.")], "images": [], "source": "data.jsonl:7"}
    with_image = {
        "messages": [user(IMAGE, "What is it?"), assistant("A box.")],
        "images": row_images(tmp_path, 0, [(40, 30)]),
        "source": "data.jsonl:8",
    }
    with pytest.raises(RowError, match=r"data.jsonl:7: 0 image\(s\), but this model family needs at least 1"):
        mapper.sft_collator(processor)([with_image, text_only])
    pref = {"prompt": [user("Yes or no?")], "chosen": [assistant("Yes.")], "rejected": [assistant("No.")]}
    with pytest.raises(RowError, match=r"pref:9: 0 image\(s\), but this model family needs at least 1"):
        mapper.dpo_collator(processor)([{**pref, "images": [], "source": "pref:9"}])


@pytest.mark.parametrize("family", IMAGES_REQUIRED_FAMILIES)
def test_verify_gives_every_row_an_image(family: str) -> None:
    """`resonance verify` samples its batch within image.required (no image-less row)."""
    _, checks = verify(REPO / "specs" / f"{family}.yaml", REPO)
    assert all(check.ok for check in checks), [(c.name, c.problems, c.error, c.skipped) for c in checks if not c.ok]


# -- prefix-LM: what the model sees ----------------------------------------------------------------------


def _model(mapper: Any, ckpt: Path) -> torch.nn.Module:
    return mapper.model.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", PREFIX_LM_FAMILIES)
def test_no_position_sees_a_later_answer_token(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """With the collator's token_type_ids, changing an answer token changes no logit before it.

    Controls: a change inside the prompt does reach earlier prompt positions (the prefix is bidirectional), and
    with token_type_ids all 0 (the answer rendered into the prompt) the answer change reaches earlier answer
    positions: the label leak the prefix-LM marks prevent.
    """
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    model = _model(mapper, ckpt)
    messages = [user(IMAGE, "Describe the picture in detail."), assistant("A green box on a table.")]
    rows = [{"messages": messages, "images": row_images(tmp_path, 0, [(40, 30)]), "source": "case:0"}]
    batch = mapper.sft_collator(processor)(rows)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    supervised = (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten().tolist()
    first, last = supervised[0], supervised[-1]
    prompt_end = first - 1  # the last prompt token (the "\n" before the answer)
    other = processor.tokenizer.eos_token_id  # the changed positions hold text tokens, never <eos>

    def logits(ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(**{**inputs, "input_ids": ids, "token_type_ids": token_type_ids}).logits[0]

    def changed(position: int) -> torch.Tensor:
        ids = batch["input_ids"].clone()
        ids[0, position] = other
        return ids

    tt = batch["token_type_ids"]
    base = logits(batch["input_ids"], tt)
    answer_changed = logits(changed(last - 1), tt)
    torch.testing.assert_close(answer_changed[: last - 1], base[: last - 1], rtol=0, atol=1e-5)
    assert not torch.allclose(answer_changed[last - 1 :], base[last - 1 :])

    prompt_changed = logits(changed(prompt_end), tt)
    assert not torch.allclose(prompt_changed[: prompt_end - 1], base[: prompt_end - 1], atol=1e-5)

    all_prefix = torch.zeros_like(tt)
    leaky = logits(batch["input_ids"], all_prefix)
    leaky_changed = logits(changed(last - 1), all_prefix)
    assert not torch.allclose(leaky_changed[first : last - 1], leaky[first : last - 1], atol=1e-5)


@pytest.mark.parametrize("family", PREFIX_LM_FAMILIES)
def test_generate_continues_the_prompt_as_suffix(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    """generate() with the inference token_type_ids equals greedy decoding where each new token is of type 1."""
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    model = _model(mapper, ckpt)
    processor.infer()
    text = processor.render_conversation([user(IMAGE, "What is shown in this image?")], add_generation_prompt=True)
    inputs = processor(text=[text], images=[[make_image(40, 30, seed=3)]])
    steps = 4
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :].tolist()
    assert new

    ids, token_type_ids = inputs["input_ids"], inputs["token_type_ids"]
    expected = []
    for _ in range(len(new)):
        with torch.no_grad():
            out = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                token_type_ids=token_type_ids,
                pixel_values=inputs["pixel_values"],
            )
        token = int(out.logits[0, -1].argmax())
        expected.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        token_type_ids = torch.cat([token_type_ids, torch.ones((1, 1), dtype=token_type_ids.dtype)], dim=1)
    assert new == expected


# -- the spec fields -------------------------------------------------------------------------------------


def test_spec_fields_validate() -> None:
    data = read_spec("llava")
    spec = ModelSpec.model_validate(data)
    assert (spec.chat_template.answer, spec.token_type_ids, spec.image.required) == ("template", "processor", False)
    with pytest.raises(ValidationError, match="chat_template.source"):
        ModelSpec.model_validate({**data, "tiny": {**data["tiny"], "chat_template": None}})
    inline = {"source": "inline", "template": "{{ messages[0]['content'] }}", "answer": "suffix"}
    spec = ModelSpec.model_validate(
        {
            **data,
            "chat_template": inline,
            "token_type_ids": "prefix_lm",
            "tiny": {**data["tiny"], "chat_template": None},
        }
    )
    assert (spec.chat_template.answer, spec.token_type_ids, spec.tiny.chat_template) == ("suffix", "prefix_lm", None)
    for bad in ({"chat_template": {**inline, "answer": "suffx"}}, {"token_type_ids": "prefix"}):
        with pytest.raises(ValidationError):
            ModelSpec.model_validate({**data, **bad})


def test_adapters_carry_the_fields_only_when_set(project: Path) -> None:
    """The generated processor class sets answer_as_suffix / prefix_lm / images_required only when used."""
    path = project / "specs" / "llava.yaml"
    plain = codegen.plan(project, [path]).files["generated/llava/__init__.py"]
    for attribute in ("answer_as_suffix", "prefix_lm", "images_required"):
        assert attribute not in plain
    text = path.read_text()
    text = text.replace("  multi_image: true\n", "  multi_image: true\n  required: true\n", 1)
    text = text.replace("chat_template:\n  source: model\n", "chat_template:\n  source: model\n  answer: suffix\n", 1)
    path.write_text(text + "token_type_ids: prefix_lm\n")
    source = codegen.plan(project, [path]).files["generated/llava/__init__.py"]
    namespace: dict[str, Any] = {}
    exec(compile(source, "llava_adapter", "exec"), namespace)  # noqa: S102 - our own compiled spec
    processor_class = namespace["LlavaProcessor"]
    assert processor_class.answer_as_suffix and processor_class.prefix_lm and processor_class.images_required
    # Everything else is as before: only the three lines were added.
    added = [line for line in source.splitlines() if line not in plain.splitlines()]
    assert sorted(line.strip() for line in added if not line.startswith("# content-sha256")) == [
        "answer_as_suffix = True",
        "images_required = True",
        "prefix_lm = True",
    ]
