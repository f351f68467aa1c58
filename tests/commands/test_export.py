"""``resonance export OUT --to DIR`` on tiny LLaVA outputs of ``resonance train``.

A merged LoRA output loads in a process that never imports Resonance (plain transformers: the model and the
processor) and generates the tokens Resonance generates from the unmerged output; a reward model and a policy with
its value head keep their heads and score as before; a full-training output is copied; a folder that is not an
output, an existing DIR without --overwrite and a DIR inside OUT are refused; a failed export leaves nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAMILIES, make_image, our_inference_batch, run_resonance, save_png, train_argv
from helpers.rows import write_data
from safetensors.torch import load_file

import resonance.commands.export as export_command
from resonance.algorithms.guards import finish_output
from resonance.base.registry import load_core_mapper
from resonance.base.reward import REWARD_CONFIG
from resonance.base.value import VALUE_CONFIG, VLModelWithValueHead
from resonance.cli import main
from resonance.errors import EXIT_FAILED, EXIT_INPUT, EXIT_OK
from resonance.generation import generate_batch, generation_kwargs, load_for_generation

QUESTION = "What colour is it?"
NEW_TOKENS = 4


def _train(tmp: Path, ckpt: Path, algorithm: str, kind: str, **overrides: object) -> Path:
    out = tmp / f"out_{algorithm}"
    done = run_resonance(
        "train", algorithm, *train_argv(algorithm, ckpt, write_data(tmp, kind), out, **overrides), cwd=tmp
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sft_lora(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[[str], Path]) -> Path:
    """A LoRA SFT output of tiny LLaVA (one step at a rate that moves the adapter)."""
    return _train(tmp_path_factory.mktemp("sft"), tiny_checkpoint("llava"), "sft", "sft")


@pytest.fixture(scope="module")
def rm_lora(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[[str], Path]) -> Path:
    """A LoRA reward model of tiny LLaVA."""
    return _train(tmp_path_factory.mktemp("rm"), tiny_checkpoint("llava"), "rm", "rm")


def _export(out: Path, to: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_resonance("export", str(out), "--to", str(to), *extra, cwd=cwd)


# -- a merged LoRA output in plain transformers -------------------------------------------------------------

PLAIN_LOAD = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, image_path, question, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=[Image.open(image_path).convert("RGB")], text=prompt, return_tensors="pt")
with torch.no_grad():
    sequences = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
imported = sorted(name for name in sys.modules if name.split(".")[0] in ("resonance", "peft"))
print(json.dumps({
    "input_ids": inputs["input_ids"][0].tolist(),
    "tokens": sequences[0, inputs["input_ids"].shape[1]:].tolist(),
    "imported": imported,
}))
"""


def _plain_generate(folder: Path, image: str, cwd: Path) -> dict[str, list]:
    """Load ``folder`` with plain transformers in a fresh process (tests/ off sys.path) and generate greedily."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(folder), image, QUESTION, str(NEW_TOKENS)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_merged_lora_generates_what_the_unmerged_output_generates_without_resonance(
    sft_lora: Path, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    merged = tmp_path / "merged"
    done = _export(sft_lora, merged, cwd=tmp_path)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    assert "merged the LoRA adapter" in done.stderr
    assert not (merged / "adapter_config.json").exists()

    # the merge is not trivial: a LoRA-targeted weight moved away from the base model's
    base = load_file(tiny_checkpoint("llava") / "model.safetensors")
    exported = load_file(merged / "model.safetensors")
    assert base.keys() == exported.keys()
    changed = [name for name in base if not torch.equal(base[name], exported[name])]
    assert changed and all("language_model" in name for name in changed), changed

    image = save_png(tmp_path, "red.png", make_image(40, 30, seed=1))
    vl_model, model, processor = load_for_generation(sft_lora, device="cpu")
    row = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]}
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    ours = generate_batch(
        model, processor, vl_model, [{**row, "images": [image]}], generation_kwargs(vl_model, model, kwargs)
    )

    plain = _plain_generate(merged, image, cwd=tmp_path)
    assert plain["imported"] == [], "the plain load must import neither resonance nor peft"
    assert plain["input_ids"] == ours.inputs["input_ids"][0].tolist()
    assert len(plain["tokens"]) == NEW_TOKENS
    assert plain["tokens"] == ours.sequences[0, ours.inputs["input_ids"].shape[1] :].tolist()


def _lora_output(ckpt: Path, out: Path, head: str | None = None, dtype: torch.dtype | None = None) -> tuple[Any, Path]:
    """An output folder as ``resonance train`` saves it, without training: a non-zero LoRA adapter on the spec's
    default targets (with the ``core_mapper`` slot ``head``'s head: ``value_model``, ``reward_model``), the
    processor, the final touches of the save. Returns the unmerged model and the folder."""
    from peft import LoraConfig, get_peft_model

    mapper = load_core_mapper(ckpt)
    targets = mapper.model.lora_target_modules(mapper.model.default_lora_target)
    torch.manual_seed(0)
    model = get_peft_model(
        # float64: eager experts, as transformers' grouped_mm kernel for mixture-of-experts layers takes no float64
        mapper.model.from_pretrained(
            ckpt, **({} if dtype is None else {"dtype": dtype, "experts_implementation": "eager"})
        ),
        LoraConfig(r=4, target_modules=targets, init_lora_weights=False),
    )
    if head is not None:
        model = getattr(mapper, head)(model)
    model.save_pretrained(out)
    mapper.processor(ckpt).hf.save_pretrained(str(out))
    finish_output(out)
    return model, out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_merges_to_the_same_outputs(
    family: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """A LoRA output (a non-zero adapter on the spec's default targets) exported and loaded with plain
    ``AutoModelForImageTextToText`` gives the logits the unmerged PEFT model gives, on prompts with images.

    In float64 from the base checkpoint on (export keeps the base's dtype): in float32 the unmerged and merged
    sums round differently, and a family that normalises every block's output (Gemma 4) rescales that rounding
    layer by layer past float32's default tolerance."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpt = tmp_path / "base"
    # eager experts: transformers' grouped_mm kernel for mixture-of-experts layers takes no float64
    base = AutoModelForImageTextToText.from_pretrained(
        tiny_checkpoint(family), dtype=torch.float64, experts_implementation="eager"
    )
    base.save_pretrained(ckpt)
    AutoProcessor.from_pretrained(tiny_checkpoint(family)).save_pretrained(ckpt)
    model, out = _lora_output(ckpt, tmp_path / "out", dtype=torch.float64)
    export_command.export(out, tmp_path / "merged")

    *_, batch = our_inference_batch(ckpt)
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    plain = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "merged", dtype=torch.float64, experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        unmerged = model.eval()(**batch).logits
        merged = plain(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    assert not torch.allclose(unmerged, base, atol=1e-4), "the adapter must change the outputs"
    torch.testing.assert_close(merged, unmerged)


# -- heads ----------------------------------------------------------------------------------------------------


def _scores(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_reward_model_exports_merged_with_its_head(rm_lora: Path, tmp_path: Path) -> None:
    from resonance.base.reward import VLRewardModel

    merged = tmp_path / "rm_merged"
    assert main(["export", str(rm_lora), "--to", str(merged)]) == EXIT_OK
    description = json.loads((merged / REWARD_CONFIG).read_text())
    assert description["backbone"] == "full"
    assert not (merged / "adapter_config.json").exists()

    ids = torch.tensor([[1, 5, 9, 23, 42, 7], [1, 8, 8, 3, 99, 12]])
    trained = VLRewardModel.from_pretrained(rm_lora)
    exported = VLRewardModel.from_pretrained(merged)
    assert trained.is_lora and not exported.is_lora
    torch.testing.assert_close(_scores(exported, ids), _scores(trained, ids))


def test_value_head_exports_merged_with_its_head(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    """A policy with its value head as PPO saves it (the LoRA adapter, value_head.safetensors, value_config.json)."""
    policy, out = _lora_output(tiny_checkpoint("llava"), tmp_path / "out_ppo", head="value_model")

    merged = tmp_path / "ppo_merged"
    assert main(["export", str(out), "--to", str(merged)]) == EXIT_OK
    assert json.loads((merged / VALUE_CONFIG).read_text())["backbone"] == "full"
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    before, after = _scores(policy, ids), _scores(VLModelWithValueHead.from_pretrained(merged), ids)
    torch.testing.assert_close(after.values, before.values)
    torch.testing.assert_close(after.logits, before.logits)


# -- full training, refusals, atomic writes -------------------------------------------------------------------


def test_full_training_output_is_copied_as_it_is(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = _train(tmp_path, tiny_checkpoint("llava"), "sft", "sft", lora_target_modules="none", learning_rate="1e-3")
    copy = tmp_path / "copy"
    with caplog.at_level(logging.INFO, logger="resonance"):
        assert main(["export", str(out), "--to", str(copy)]) == EXIT_OK
    assert "nothing to merge" in caplog.text
    assert (copy / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert not (copy / "training_args.bin").exists()


def test_refuses_what_it_cannot_export(sft_lora: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "not_an_output").mkdir()
    (tmp_path / "not_an_output" / "notes.txt").write_text("hello")
    assert main(["export", str(tmp_path / "not_an_output"), "--to", str(tmp_path / "a")]) == EXIT_INPUT
    assert "not a Resonance training output" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--to", str(tmp_path / "b")]) == EXIT_INPUT
    assert "no such folder" in capsys.readouterr().err
    moved = tmp_path / "moved"  # an adapter whose base path was relative to where training ran
    moved.mkdir()
    (moved / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "ckpt"}))
    assert main(["export", str(moved), "--to", str(tmp_path / "c")]) == EXIT_INPUT
    assert "adapter_config.json: base_model_name_or_path ckpt: no such folder" in capsys.readouterr().err
    assert main(["export", str(sft_lora), "--to", str(sft_lora / "merged")]) == EXIT_INPUT
    assert "inside the output folder" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(["export", str(sft_lora), "--to", str(existing)]) == EXIT_FAILED
    assert "--overwrite" in capsys.readouterr().err
    assert (existing / "keep.txt").read_text() == "mine"
    assert not any(tmp_path.glob(".existing.*")), "nothing staged before the refusal"


def test_overwrite_replaces_the_folder_whole(sft_lora: Path, tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "stale.txt").write_text("from before")
    assert main(["export", str(sft_lora), "--to", str(existing), "--overwrite"]) == EXIT_OK
    assert not (existing / "stale.txt").exists()
    assert (existing / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"], "no staging or old folder left"


def test_a_failed_export_leaves_nothing(sft_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_save(model: object, mapper: object) -> object:
        class HalfSave:
            def save_pretrained(self, folder: Path) -> None:
                (Path(folder) / "model.safetensors").write_bytes(b"half")
                raise OSError(28, "No space left on device")

        return HalfSave()

    monkeypatch.setattr(export_command, "_merged_model", half_save)
    with pytest.raises(OSError, match="No space"):
        export_command.export(sft_lora, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_exported_files_are_readable_by_others(sft_lora: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    old = os.umask(0o022)
    try:
        assert main(["export", str(sft_lora), "--to", str(merged)]) == EXIT_OK
    finally:
        os.umask(old)
    assert merged.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in merged.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_merged_weights_keep_the_base_checkpoints_dtype(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    """A bf16 base stays bf16 (the fp32 adapter is merged into it), not an fp32 folder twice the size."""
    ckpt, bf16 = tiny_checkpoint("llava"), tmp_path / "bf16"
    mapper = load_core_mapper(ckpt)
    mapper.model.from_pretrained(ckpt, dtype=torch.bfloat16).save_pretrained(bf16)
    mapper.processor(ckpt).hf.save_pretrained(str(bf16))
    model, out = _lora_output(bf16, tmp_path / "out", dtype=torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert main(["export", str(out), "--to", str(tmp_path / "merged")]) == EXIT_OK
    dtypes = {tensor.dtype for tensor in load_file(tmp_path / "merged" / "model.safetensors").values()}
    assert dtypes == {torch.bfloat16}
