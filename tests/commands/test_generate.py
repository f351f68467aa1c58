"""``resonance generate`` and :func:`resonance.generation.generate_batch`.

Every family: a left-padded batch of two prompts of different lengths generates exactly what each prompt
generates alone. Then the generation flags, prompt rows, and the command end to end on tiny LLaVA (a base
checkpoint and a LoRA output folder), with its failure modes: bad rows named by FILE:LINE, no output (and
no temporary file) after a failure or Ctrl-C, an existing output refused. The GPU twin (marked gpu) generates
in bf16 on CUDA.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAMILIES, generate_argv, make_image, run_resonance, save_png, write_jsonl
from typer.testing import CliRunner

import resonance.commands.generate as gen
from resonance.cli import app
from resonance.commands.generate import parse_generation_overrides
from resonance.data.images import ImageCount
from resonance.data.rows import read_rows
from resonance.errors import ConfigError, DataError, OutputExistsError, RowError
from resonance.generation import generate_batch, generation_kwargs, load_for_generation

IMAGE_PART = {"type": "image"}


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _prompt_file(folder: Path, extra_rows: list[dict[str, Any]] | None = None, takes_system: bool = True) -> Path:
    """Two prompt rows of different lengths (a DPO-style prompt; an SFT row whose answer is dropped, with a system
    message unless ``takes_system`` is False: a family whose template takes none, spec chat_template.system)."""
    save_png(folder, "small.png", make_image(40, 30, seed=1))
    save_png(folder, "box.png", make_image(64, 48, seed=2))
    rows: list[dict[str, Any]] = [
        {"id": 1, "image": "small.png", "prompt": [{"role": "user", "content": [IMAGE_PART, _text("What is it?")]}]},
        {
            "id": "second",
            "images": ["box.png"],
            "messages": [
                *([{"role": "system", "content": "You are a helpful assistant."}] if takes_system else []),
                {"role": "user", "content": [IMAGE_PART, _text("Describe the picture.")]},
                {"role": "assistant", "content": "A green box on a table."},
                {"role": "user", "content": "Is there any text in the image? Please read it to me."},
                {"role": "assistant", "content": "No, there is no text."},
            ],
        },
    ]
    return write_jsonl(folder / "prompts.jsonl", rows + (extra_rows or []))


def _rows(path: Path, processor: Any) -> list[dict[str, Any]]:
    return read_rows(path, "prompt", image_placeholder=processor.image_placeholder).rows


# -- every family: batched generation equals one prompt at a time ---------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_generates_what_each_prompt_generates_alone(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    vl_model, model, processor = load_for_generation(tiny_checkpoint(family), device="cpu")
    rows = _rows(_prompt_file(tmp_path, takes_system=processor.takes_system), processor)
    # min_new_tokens: a random tiny model may pick EOS first; four compared tokens per row, every time.
    kwargs = generation_kwargs(vl_model, model, {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False})
    batch = generate_batch(model, processor, vl_model, rows, kwargs)

    mask = batch.inputs["attention_mask"]
    assert mask[:, -1].all() and not mask.all(), "the prompts must differ in length and be left-padded"
    assert int(mask[0].sum()) != int(mask[1].sum())
    assert [len(ids) for ids in batch.token_ids] == [4, 4]
    length = batch.inputs["input_ids"].shape[1]
    assert torch.equal(batch.sequences[:, :length], batch.inputs["input_ids"])
    for i, row in enumerate(rows):
        alone = generate_batch(model, processor, vl_model, [row], kwargs)
        assert alone.inputs["attention_mask"].all()
        assert alone.prompts[0] == batch.prompts[i]
        assert alone.token_ids[0] == batch.token_ids[i], f"row {i}: batched generation differs from alone"
        assert alone.texts[0] == batch.texts[i]
    assert processor.padding_side == processor.infer_padding_side


# -- generation kwargs -----------------------------------------------------------------------------------


def test_overrides_replace_the_family_defaults(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    vl_model, model, processor = load_for_generation(tiny_checkpoint("llava"), device="cpu")
    defaults = vl_model.prepare_default_generation_kwargs(model.generation_config)
    assert defaults["max_new_tokens"] == 1024 and defaults["do_sample"] is False
    kwargs = generation_kwargs(vl_model, model, {"max_new_tokens": 2, "min_new_tokens": 2})
    assert kwargs == {**defaults, "max_new_tokens": 2, "min_new_tokens": 2}

    rows = _rows(_prompt_file(tmp_path), processor)
    short = generate_batch(model, processor, vl_model, rows, kwargs)
    longer = generate_batch(model, processor, vl_model, rows, {**kwargs, "max_new_tokens": 5, "min_new_tokens": 5})
    assert [len(ids) for ids in short.token_ids] == [2, 2]
    assert [len(ids) for ids in longer.token_ids] == [5, 5]
    assert [ids[:2] for ids in longer.token_ids] == short.token_ids  # greedy: the same start


def test_answers_end_at_the_first_eos_without_padding(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """A row that finishes early gets its tokens through EOS; the pad tokens generate() adds are dropped."""
    vl_model, model, processor = load_for_generation(tiny_checkpoint("llava"), device="cpu")
    rows = _rows(_prompt_file(tmp_path), processor)
    kwargs = generation_kwargs(vl_model, model, {"max_new_tokens": 3, "min_new_tokens": 3})
    first = generate_batch(model, processor, vl_model, rows, kwargs)
    # Make the first row's second new token an end of sequence: its answer stops there, the other row goes on.
    eos_token = first.token_ids[0][1]
    result = generate_batch(
        model, processor, vl_model, rows, {**kwargs, "min_new_tokens": 0, "eos_token_id": eos_token}
    )
    assert result.token_ids[0] == first.token_ids[0][:2]
    assert eos_token not in result.token_ids[1][:-1]
    assert result.texts[0] == processor.tokenizer.decode(result.token_ids[0], skip_special_tokens=True).strip()


def test_parse_generation_overrides() -> None:
    args = ["--max_new_tokens", "64", "--do_sample", "true", "--temperature=0.7", "--top_p", "0.9", "--top_k", "5"]
    assert parse_generation_overrides(args) == {
        "max_new_tokens": 64,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
    }
    assert parse_generation_overrides(["--eos_token_id", "[1, 2]", "--do_sample", "False"]) == {
        "eos_token_id": [1, 2],
        "do_sample": False,
    }
    with pytest.raises(ConfigError, match="did you mean --max_new_tokens"):
        parse_generation_overrides(["--max_new_token", "3"])
    with pytest.raises(ConfigError, match="--top_p needs a value"):
        parse_generation_overrides(["--top_p", "--top_k", "3"])
    with pytest.raises(ConfigError, match="unexpected argument 'True'"):
        parse_generation_overrides(["True"])


# -- prompt rows -----------------------------------------------------------------------------------------


def test_prompt_rows(tmp_path: Path) -> None:
    """DPO prompts (answers ignored) and SFT rows (trailing answers dropped); ids kept; problems name FILE:LINE."""
    save_png(tmp_path, "a.png", make_image(8, 8))
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": 7, "image": "a.png", "prompt": "<image>\nWhat?", "chosen": "A.", "rejected": "B."},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
            {"messages": [{"role": "assistant", "content": "Only an answer."}]},
            {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
            {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]},
            {"image": "missing.png", "prompt": "Hi"},
        ],
    )
    with pytest.raises(DataError) as caught:
        read_rows(path, "prompt")
    errors = dict(caught.value.errors)
    assert sorted(errors) == [f"{path}:{line}" for line in (3, 4, 5, 6)]
    assert "must end with a user turn" in errors[f"{path}:3"] and "must end with a user turn" in errors[f"{path}:4"]
    assert "keep one" in errors[f"{path}:5"]
    assert "image file not found" in errors[f"{path}:6"]

    loaded = read_rows(path, "prompt", skip_invalid=True)
    assert loaded.skipped == 4
    first, second = loaded.rows
    assert first == {
        "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What?"}]}],
        "images": [str(tmp_path / "a.png")],
        "source": f"{path}:1",
        "id": "7",
    }
    assert second["prompt"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert second["id"] is None and second["source"] == f"{path}:2"
    assert loaded.to_dataset().column_names == ["prompt", "images", "source", "id"]

    with pytest.raises(DataError, match=r"p\.jsonl:2: 0 image\(s\), but this model family needs at least 1"):
        read_rows(path, "prompt", skip_invalid=False, image_count=ImageCount(1), check_images=False)


def test_unreadable_image_at_generation_names_the_row(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """An image gone between loading and generating (PPO reads rows lazily) is an error naming the row."""
    vl_model, model, processor = load_for_generation(tiny_checkpoint("llava"), device="cpu")
    rows = _rows(_prompt_file(tmp_path), processor)
    Path(rows[1]["images"][0]).unlink()
    with pytest.raises(RowError, match=r"prompts\.jsonl:2: cannot read image"):
        generate_batch(model, processor, vl_model, rows, {"max_new_tokens": 1})


# -- the command -----------------------------------------------------------------------------------------


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["generate", *args])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_base_checkpoint(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """The installed ``resonance generate`` command: one object per row, in input order, as generate_batch."""
    ckpt = tiny_checkpoint("llava")
    data = _prompt_file(tmp_path, [{"prompt": "Say hello."}])
    output = tmp_path / "answers.jsonl"
    argv = generate_argv(ckpt, data, output, batch_size=2, max_new_tokens=3, min_new_tokens=3)
    result = run_resonance("generate", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"wrote 3 answers to {output}" in result.stderr

    records = _read_jsonl(output)
    assert [r["source"] for r in records] == [f"{data}:{line}" for line in (1, 2, 3)]
    assert [r.get("id") for r in records] == [1, "second", None]
    assert "id" not in records[2]
    vl_model, model, processor = load_for_generation(ckpt, device="cpu")
    rows = _rows(data, processor)
    expected = generate_batch(model, processor, vl_model, rows, {"max_new_tokens": 3, "min_new_tokens": 3})
    assert [r["prompt"] for r in records] == expected.prompts
    assert [r["answer"] for r in records] == expected.texts
    assert records[1]["prompt"].rstrip().endswith("ASSISTANT:")  # the SFT row's answer was dropped
    assert "No, there is no text." not in records[1]["prompt"]
    assert _leftovers(tmp_path) == []


def _lora_folder(ckpt: Path, folder: Path) -> Path:
    """A LoRA output folder as `resonance train` leaves it (adapter + processor), with non-zero LoRA weights."""
    from peft import LoraConfig, get_peft_model

    from resonance.base.registry import load_core_mapper

    mapper = load_core_mapper(ckpt)
    torch.manual_seed(0)
    model = mapper.model.from_pretrained(ckpt)
    target = mapper.model.lora_target_modules(mapper.model.default_lora_target)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=target, init_lora_weights=False))
    peft_model.save_pretrained(folder)
    mapper.processor(ckpt).save_pretrained(folder)
    return folder


def test_cli_lora_output_folder(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear

    ckpt = tiny_checkpoint("llava")
    lora = _lora_folder(ckpt, tmp_path / "lora")
    data = _prompt_file(tmp_path)
    output = tmp_path / "answers.jsonl"
    merged: list[bool] = []
    generate_from = gen.generate_from

    def watched(model, *args):
        merged.append(all(m.merged for m in model.modules() if isinstance(m, LoraLinear)))
        return generate_from(model, *args)

    monkeypatch.setattr(gen, "generate_from", watched)
    result = _invoke(*generate_argv(lora, data, output, max_new_tokens=4, min_new_tokens=4))
    assert result.exit_code == 0, result.output
    assert merged and all(merged)
    records = _read_jsonl(output)

    vl_model, model, processor = load_for_generation(lora, device="cpu")
    assert isinstance(model, PeftModel)
    rows = _rows(data, processor)
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4}
    with_adapter = generate_batch(model, processor, vl_model, rows, kwargs)
    # the command decodes with the adapters merged into the weights; here through PEFT's adapter layers
    assert [r["answer"] for r in records] == with_adapter.texts
    _, base_model, base_processor = load_for_generation(ckpt, device="cpu")
    without = generate_batch(base_model, base_processor, vl_model, rows, kwargs)
    assert with_adapter.token_ids != without.token_ids, "the adapter did not change the answers"


def test_cli_missing_image_names_the_row(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    data = _prompt_file(tmp_path, [{"image": "nope.png", "prompt": "What is it?"}])
    output = tmp_path / "answers.jsonl"
    result = _invoke(*generate_argv(tiny_checkpoint("llava"), data, output))
    assert result.exit_code == 2
    assert f"{data}:3: image: image file not found" in result.stderr
    assert not output.exists() and _leftovers(tmp_path) == []


def test_cli_row_without_image_for_a_family_that_needs_one(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    ckpt = tiny_checkpoint("paligemma")
    data = _prompt_file(tmp_path, [{"id": "text-only", "prompt": "What is it?"}])
    output = tmp_path / "answers.jsonl"
    base = generate_argv(ckpt, data, output, max_new_tokens=2)
    result = _invoke(*base)
    assert result.exit_code == 2
    assert f"{data}:3: 0 image(s), but this model family needs at least 1 per conversation" in result.stderr
    assert not output.exists() and _leftovers(tmp_path) == []

    result = _invoke(*base, "--skip_invalid_rows")
    assert result.exit_code == 0, result.output
    assert "wrote 2 answers" in result.stderr and "1 invalid rows skipped" in result.stderr
    assert [r["source"] for r in _read_jsonl(output)] == [f"{data}:1", f"{data}:2"]


def test_cli_refuses_to_overwrite(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    data = _prompt_file(tmp_path)
    output = tmp_path / "answers.jsonl"
    output.write_text("keep me\n")
    base = generate_argv(tiny_checkpoint("llava"), data, output, max_new_tokens=2)
    result = _invoke(*base)
    assert result.exit_code == 1
    assert "exists; pass --overwrite" in result.stderr
    assert output.read_text() == "keep me\n"

    result = _invoke(*base, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(_read_jsonl(output)) == 2
    assert _leftovers(tmp_path) == []


def test_cli_rejects_unknown_generation_flag(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    data = _prompt_file(tmp_path)
    output = tmp_path / "answers.jsonl"
    result = _invoke(*generate_argv(tiny_checkpoint("llava"), data, output, max_new_token=2))
    assert result.exit_code == 2
    assert "unknown option --max_new_token" in result.stderr and "did you mean --max_new_tokens" in result.stderr
    assert not output.exists()


@pytest.mark.parametrize("failure", [RuntimeError("out of memory"), KeyboardInterrupt()])
def test_failure_midway_leaves_no_output(
    failure: BaseException, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first batch is written to the temporary file, the second fails: no output, no temporary file."""
    calls = []
    real = gen._generate_batch

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "_generate_batch", failing)
    data = _prompt_file(tmp_path)
    output = tmp_path / "answers.jsonl"
    with pytest.raises(type(failure)):
        gen.run(str(tiny_checkpoint("llava")), str(data), output, batch_size=1, overrides={"max_new_tokens": 2})
    assert len(calls) == 2
    assert not output.exists() and _leftovers(tmp_path) == []

    with pytest.raises(OutputExistsError):  # and the refusal comes before any work
        output.write_text("x\n")
        gen.run(str(tiny_checkpoint("llava")), str(data), output)
    assert len(calls) == 2


def test_seed_makes_sampling_repeatable(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt, data = str(tiny_checkpoint("llava")), str(_prompt_file(tmp_path))
    sampling = {"do_sample": True, "temperature": 5.0, "max_new_tokens": 6, "min_new_tokens": 6}
    answers = []
    for seed in (3, 3, 4):
        output = tmp_path / f"seed{len(answers)}.jsonl"
        gen.run(ckpt, data, output, seed=seed, overrides=sampling)
        answers.append([r["answer"] for r in _read_jsonl(output)])
    assert answers[0] == answers[1]
    assert answers[0] != answers[2]


def test_several_answers_per_prompt(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--num_return_sequences 3 with sampling: each line holds its prompt's 3 answers (``answers``), in input order,
    and each prompt is prefilled once (2 rows in the first forward pass for 2 prompts, 6 in every decode step), as
    it is for 3 beams (2 of them returned). Greedy decoding is refused before the model loads; 1 keeps the one
    ``answer``."""
    ckpt, data = str(tiny_checkpoint("llava")), str(_prompt_file(tmp_path))
    embedded: list[int] = []
    load = gen.load_for_generation

    def counted(checkpoint: str) -> Any:
        vl_model, model, processor = load(checkpoint)
        embeddings = model.get_input_embeddings()
        embeddings.register_forward_hook(lambda module, args, output: embedded.append(output.shape[0]))
        return vl_model, model, processor

    monkeypatch.setattr(gen, "load_for_generation", counted)
    sampling = {"do_sample": True, "temperature": 5.0, "max_new_tokens": 4, "min_new_tokens": 4}
    gen.run(ckpt, data, tmp_path / "three.jsonl", seed=0, overrides={**sampling, "num_return_sequences": 3})
    records = _read_jsonl(tmp_path / "three.jsonl")
    assert [r["id"] for r in records] == [1, "second"] and all("answer" not in r for r in records)
    assert [len(r["answers"]) for r in records] == [3, 3]
    assert all(isinstance(a, str) and a for r in records for a in r["answers"])
    assert len({a for r in records for a in r["answers"]}) > 1  # sampled at temperature 5: not one answer repeated
    assert embedded[0] == 2 and set(embedded[1:]) == {6}, embedded
    embedded.clear()
    beams = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 4, "min_new_tokens": 4}
    gen.run(ckpt, data, tmp_path / "beams.jsonl", overrides=beams)
    assert [len(r["answers"]) for r in _read_jsonl(tmp_path / "beams.jsonl")] == [2, 2]
    assert embedded[0] == 2 and set(embedded[1:]) == {6}, embedded  # a prompt per beam, prefilled once
    gen.run(ckpt, data, tmp_path / "one.jsonl", seed=0, overrides={**sampling, "num_return_sequences": 1})
    assert all(isinstance(r["answer"], str) and "answers" not in r for r in _read_jsonl(tmp_path / "one.jsonl"))
    embedded.clear()
    with pytest.raises(ConfigError, match="--num_return_sequences 3: greedy decoding .* add --do_sample true"):
        gen.run(ckpt, data, tmp_path / "greedy.jsonl", overrides={"num_return_sequences": 3, "max_new_tokens": 4})
    assert not embedded and not (tmp_path / "greedy.jsonl").exists()
    with pytest.raises(ConfigError, match="--num_return_sequences 0: must be"):
        gen.run(ckpt, data, tmp_path / "none.jsonl", overrides={**sampling, "num_return_sequences": 0})


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_generation_on_cuda(family: str, tiny_checkpoint, tmp_path: Path) -> None:
    """The GPU twin of test_batch_generates_what_each_prompt_generates_alone: a batch generated in bf16 on CUDA."""
    assert torch.cuda.is_available(), "a GPU test: run it on the device machine with -m gpu"
    vl_model, model, processor = load_for_generation(tiny_checkpoint(family))
    assert next(model.parameters()).is_cuda and next(model.parameters()).dtype == torch.bfloat16
    rows = _rows(_prompt_file(tmp_path, takes_system=processor.takes_system), processor)
    kwargs = generation_kwargs(vl_model, model, {"max_new_tokens": 4})
    out = generate_batch(model, processor, vl_model, rows, kwargs)
    assert len(out.token_ids) == 2 and all(1 <= len(ids) <= 4 for ids in out.token_ids)
    assert out.sequences.is_cuda
