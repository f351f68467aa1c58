"""Qwen-VL vision towers with batched segment attention give the same image features as transformers' own
per-segment sdpa calls, in one attention call per block (resonance.patches.vision_attention)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import load_adapter, make_image

from resonance.patches.vision_attention import install_batched_vision_attention, segment_attention

BATCHED = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _reference(query, key, value, cu_seqlens, scale):
    out = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out.append(F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1))
    return torch.cat(out).flatten(1)


@pytest.mark.parametrize("lengths", [[4, 4, 4], [5, 2, 7, 1], [9]])
def test_segments_attend_within_themselves_only(lengths: list[int]) -> None:
    torch.manual_seed(0)
    total = sum(lengths)
    query, key, value = (torch.randn(total, 3, 8) for _ in range(3))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out = segment_attention(query, key, value, cu_seqlens, 0.35)
    torch.testing.assert_close(out, _reference(query, key, value, cu_seqlens, 0.35), rtol=1e-5, atol=1e-6)


def test_segment_lengths_read_once_per_tensor_and_again_after_a_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block of a tower gets the same ``cu_seqlens``: its lengths reach the host (a GPU sync) once."""
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or original(t))
    query, key, value = (torch.randn(9, 2, 4) for _ in range(3))
    cu_seqlens = torch.tensor([0, 4, 9])
    for _ in range(3):
        segment_attention(query, key, value, cu_seqlens, 0.5)
    assert len(reads) == 1
    cu_seqlens[1] = 6  # changed in place: read again, and the new segments are used
    out = segment_attention(query, key, value, cu_seqlens, 0.5)
    assert len(reads) == 2
    torch.testing.assert_close(out, _reference(query, key, value, cu_seqlens, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", BATCHED)
def test_tower_features_match_per_segment_attention(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    model = mapper.model.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert mapper.model.batched_vision_attention
    tower = mapper.model.get_vision_tower(model)
    # Loading installed it; a fresh copy of the original forward per module is the reference.
    patched = [m for m in tower.modules() if getattr(m.__dict__.get("forward"), "_resonance_batched", False)]
    assert patched, "from_pretrained installs the batched attention"
    # Sizes giving full and partial windows (Qwen2.5-VL's tiny windows are 2x2 merged tokens).
    images = [make_image(64, 48, seed=1), make_image(32, 32, seed=2), make_image(100, 72, seed=3)]
    batch = processor.hf.image_processor(images=images, return_tensors="pt")
    inputs = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    calls = {"sdpa": 0}
    original_sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls["sdpa"] += 1
        return original_sdpa(*args, **kwargs)

    with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention = counting
        try:
            batched = model.get_image_features(**inputs, return_dict=True).pooler_output
            batched_calls, calls["sdpa"] = calls["sdpa"], 0
            for module in patched:
                del module.forward  # back to the class's forward: transformers' per-segment calls
            reference = model.get_image_features(**inputs, return_dict=True).pooler_output
        finally:
            torch.nn.functional.scaled_dot_product_attention = original_sdpa
    batched, reference = torch.cat(list(batched)), torch.cat(list(reference))
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    assert batched_calls == len(patched)  # one call per block
    assert calls["sdpa"] > len(patched)  # transformers: one per image or window
    assert install_batched_vision_attention(tower) == len(patched)


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm", "grpo", "ppo"])
def test_every_trainer_batches_the_tower_of_a_model_built_elsewhere(
    algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that reaches the trainer without Resonance's loading (the Python API, the benchmarks) gets the batched
    tower too: the trainers install it, as loading does."""
    from helpers import train_argv, write_data

    from resonance.algorithms import setup
    from resonance.commands.train import build_trainer, parse

    load_model = setup.load_model

    def unbatched(*args, **kwargs):
        model, dtype = load_model(*args, **kwargs)
        for module in model.modules():
            module.__dict__.pop("forward", None)  # transformers' own per-segment forward again
        return model, dtype

    monkeypatch.setattr(setup, "load_model", unbatched)
    kind = "prompt" if algorithm in ("grpo", "ppo") else algorithm
    argv = train_argv(algorithm, tiny_checkpoint("qwen2_5_vl"), write_data(tmp_path, kind), tmp_path / "out")
    if algorithm in ("grpo", "ppo"):
        argv += ["--reward_funcs", "helpers.rewards:token_sum_reward"]
    trainer, _ = build_trainer(algorithm, *parse(algorithm, argv))
    modules = list(trainer.model.modules())
    batched = [m for m in modules if getattr(m.__dict__.get("forward"), "_resonance_batched", False)]
    attention = [m for m in modules if type(m).__name__.endswith("VisionAttention")]
    assert attention and len(batched) == len(attention)
