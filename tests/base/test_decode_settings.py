"""The rollouts' KV cache (resonance.generation.decode_settings): what ``cache_implementation`` auto picks, the static
cache's size in buckets, and the flag's checks in ``resonance train`` and ``resonance generate``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resonance.commands.flags import generation_problems
from resonance.errors import ConfigError
from resonance.generation import CACHE_BUCKET, check_cache_implementation, decode_settings, static_cache_by_default


class _Model(nn.Module):
    """A model whose parameters say they are on ``device`` (no GPU needed to ask what auto picks there)."""

    def __init__(self, device: str, compiles: bool = True):
        super().__init__()
        self.device_type = device
        self._can_compile_fullgraph = compiles

    def parameters(self, recurse: bool = True):
        class _OnDevice:
            device = torch.device(self.device_type)

        yield _OnDevice()


def test_auto_is_static_on_cuda_only() -> None:
    assert static_cache_by_default(_Model("cuda"), {})
    assert not static_cache_by_default(_Model("cpu"), {})
    assert not static_cache_by_default(_Model("cuda", compiles=False), {})  # e.g. Idefics3, PaliGemma
    assert not static_cache_by_default(_Model("cuda"), {"synced_gpus": True})  # FSDP / ZeRO-3 rollouts
    assert not static_cache_by_default(_Model("cuda"), {"disable_compile": True})


def test_settings() -> None:
    asked = {"max_new_tokens": 64, "do_sample": True}
    on_cpu = decode_settings(_Model("cpu"), 300, {**asked, "cache_implementation": "auto"})
    assert on_cpu == asked  # transformers' dynamic cache
    assert decode_settings(_Model("cuda"), 300, {**asked, "cache_implementation": "dynamic"}) == asked
    on_gpu = decode_settings(_Model("cuda"), 300, asked)  # absent means auto
    assert on_gpu == {**asked, "cache_implementation": "static", "max_cache_len": 2 * CACHE_BUCKET}
    exact = decode_settings(_Model("cpu"), 192, {**asked, "cache_implementation": "static"})
    assert exact["max_cache_len"] == CACHE_BUCKET  # 192 + 64 fills one bucket, no more
    kept = decode_settings(_Model("cpu"), 10, {**asked, "cache_implementation": "static", "max_cache_len": 999})
    assert kept["max_cache_len"] == 999
    other = decode_settings(_Model("cuda"), 10, {**asked, "cache_implementation": "offloaded"})
    assert other == {**asked, "cache_implementation": "offloaded"}


def test_flag_checks() -> None:
    for value in ("auto", "static", "dynamic", "offloaded", None):
        check_cache_implementation(value)
    with pytest.raises(ConfigError, match=r"--cache_implementation fast: must be one of auto, static, dynamic"):
        check_cache_implementation("fast")
    assert generation_problems({"cache_implementation": "auto", "max_new_tokens": 8}) == []
    (problem,) = generation_problems({"cache_implementation": "fast"})
    assert "cache_implementation" in problem
