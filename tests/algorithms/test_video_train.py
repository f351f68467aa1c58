"""Videos in training: one SFT, DPO and RM step on each family whose spec has ``video:``, with video rows from a
JSONL file (an mp4 and a list of frames, written here), reaching the model; frozen-tower video features encoded
once (transformers' ``get_video_features``) give the same loss as the video through the forward; GRPO, PPO and
``resonance generate`` refuse a video row by name (their generation takes no video yet)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_adapter, one_bf16_step, read_spec, train_argv, write_jsonl
from helpers.rewards import REWARDS
from helpers.video import (
    OWN_VIDEO_FAMILY,
    SHARED_TOKEN_FAMILIES,
    VIDEO_FAMILIES,
    least_frames,
    own_video_inputs,
    video_pixels,
    write_clip,
    write_frames,
)

from resonance.algorithms.image_features import ImageEncodingMixin
from resonance.commands.train import build_trainer, parse
from resonance.data.videos import video_ref
from resonance.errors import DataError

ANSWER = {"role": "assistant", "content": "A white square moves to the right."}


def _data(folder: Path, algorithm: str, family: str) -> Path:
    """Two rows: a video file, and a list of frames (LLaMA-Factory's two spellings of a video); as many frames as
    the family's fixed count where it has one."""
    write_clip(folder, "clip.mp4", count=max(8, least_frames(family)), fps=4)
    frames = [str(Path(p).relative_to(folder)) for p in write_frames(folder, "frames", least_frames(family) or 4)]
    if algorithm == "sft":
        rows = [
            {"messages": [{"role": "user", "content": "<video>What happens?"}, ANSWER], "videos": ["clip.mp4"]},
            {"messages": [{"role": "user", "content": "Describe the clip."}, ANSWER], "video": frames},
        ]
    else:
        pair = {"chosen": ANSWER["content"], "rejected": "Nothing happens, the clip is black."}
        rows = [
            {"prompt": "<video>What happens?", **pair, "videos": ["clip.mp4"]},
            {"prompt": "Describe the clip.", **pair, "video": frames},
        ]
    return write_jsonl(folder / f"{algorithm}.jsonl", rows)


def _forward_inputs(model: torch.nn.Module, model_class: str) -> list[dict[str, Any]]:
    """The keyword arguments of every call to the forward of the multimodal model (``.model`` of the transformers
    model ``model_class``) inside ``model`` (LoRA-wrapped, or under the reward model's head), recorded."""
    seen: list[dict[str, Any]] = []

    def record(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(dict(kwargs))

    [outer] = [module for module in model.modules() if type(module).__name__ == model_class]
    outer.model.register_forward_pre_hook(record, with_kwargs=True)
    return seen


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm"])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_one_step_with_video_rows(
    family: str, algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """The frozen tower (--freeze_vision_tower, LoRA on the language model): each batch's videos are encoded once
    and reach the forward as ``mm_encoder_outputs["video"]``, with the grid (as ``mm_encoder_outputs["image"]``
    where the frames join the images' inputs); LoRA trains."""
    argv = train_argv(algorithm, tiny_checkpoint(family), _data(tmp_path, algorithm, family), tmp_path / "out")
    trainer, processor = build_trainer(algorithm, *parse(algorithm, argv))
    seen = _forward_inputs(trainer.model, trainer.vl_model.hf_model_class)
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".lora_B.default." in n}
    trainer.train()

    modality = "video" if video_pixels(family) else "image"
    with_video = [kwargs for kwargs in seen if modality in (kwargs.get("mm_encoder_outputs") or {})]
    assert with_video, [sorted(k for k, v in kwargs.items() if v is not None) for kwargs in seen]
    for kwargs in with_video:
        # the pixels encoded ahead; the other video inputs (grids, frame counts) still reach the forward
        for name in own_video_inputs(family):
            assert (kwargs.get(name) is None) == (name == video_pixels(family)), name
        assert video_pixels(family) or kwargs.get("pixel_values") is None  # frames among the images' pixels
        features = kwargs["mm_encoder_outputs"][modality].pooler_output
        tokens = int(processor.video_token_mask(kwargs).sum())
        # one feature per video token of the rows; DPO's shared-prompt rows hold each prompt's video once
        assert tokens in (sum(f.shape[0] for f in features), 2 * sum(f.shape[0] for f in features))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 1 and math.isfinite(losses[0])
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[name], before) for name, before in lora_b.items())


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["sft", "dpo", "rm"])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_one_bf16_step_with_video_rows_on_cuda(
    family: str, algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """The GPU twin of test_one_step_with_video_rows: bf16 with gradient checkpointing, the frozen tower run once
    for the step's videos."""
    one_bf16_step(algorithm, tiny_checkpoint(family), _data(tmp_path, algorithm, family), tmp_path / "out")


def test_a_trained_tower_gets_the_video_pixels(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """With the tower trained (full training), nothing is encoded ahead: the pixels go through the forward."""
    family = OWN_VIDEO_FAMILY
    overrides = {"lora_target_modules": "none", "freeze_vision_tower": False}
    argv = train_argv("sft", tiny_checkpoint(family), _data(tmp_path, "sft", family), tmp_path / "out", **overrides)
    trainer, _ = build_trainer("sft", *parse("sft", argv))
    seen = _forward_inputs(trainer.model, trainer.vl_model.hf_model_class)
    trainer.train()
    assert any(torch.is_tensor(kwargs.get(video_pixels(family))) for kwargs in seen)
    assert not any("video" in (kwargs.get("mm_encoder_outputs") or {}) for kwargs in seen)


@pytest.mark.parametrize("family", SHARED_TOKEN_FAMILIES)
def test_a_trained_tower_gets_images_and_videos_of_one_token_apart(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """Images and videos in one batch where videos expand into the image token, the tower trained: the forward gets
    their features merged in token order (its own would read every image token as an image's and refuse the batch),
    computed with gradients, and the tower trains."""
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "cat.png")
    write_clip(tmp_path, "clip.mp4", count=8, fps=4)
    row = {"messages": [{"role": "user", "content": "<image><video>Same?"}, ANSWER], "images": ["cat.png"]}
    data = write_jsonl(tmp_path / "sft.jsonl", [{**row, "videos": ["clip.mp4"]}])
    overrides = {"lora_target_modules": "none", "freeze_vision_tower": False}
    trainer, _ = build_trainer(
        "sft", *parse("sft", train_argv("sft", tiny_checkpoint(family), data, tmp_path / "o", **overrides))
    )
    seen = _forward_inputs(trainer.model, trainer.vl_model.hf_model_class)
    tower = trainer.vl_model.get_vision_tower(trainer.model)
    before = {name: p.detach().clone() for name, p in tower.named_parameters()}
    trainer.train()

    [kwargs] = [kwargs for kwargs in seen if kwargs.get("mm_encoder_outputs")]
    assert set(kwargs["mm_encoder_outputs"]) == {"image"} and kwargs["pixel_values_videos"] is None
    [features] = kwargs["mm_encoder_outputs"]["image"].pooler_output
    assert features.requires_grad and len(features) == int(
        (kwargs["input_ids"] == trainer.vl_processor.image_token_id).sum()
    )
    assert any(not torch.equal(p, before[name]) for name, p in tower.named_parameters())


@contextlib.contextmanager
def _video_tokens_apart(model: torch.nn.Module, processor: Any, batch: dict[str, Any]) -> Iterator[None]:
    """The model's forward as the reference for a batch holding images and videos. Where videos expand into the image
    token (spec video.token: image.token, GLM-4.1V), transformers' forward reads every image token as an image's and
    refuses such a batch: its placeholder masks are then told apart by the batch's mm_token_type_ids (transformers'
    processor marks an image's tokens 1, a video's 2)."""
    if not processor.video_tokens_need_types():
        yield
        return
    inner = model.model
    original = inner.get_placeholder_mask
    types = batch["mm_token_type_ids"].unsqueeze(-1)

    def masks(input_ids: Any, inputs_embeds: Any, **features: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, video = original(input_ids, inputs_embeds)
        return image & (types == 1), video & (types == 2)

    inner.get_placeholder_mask = masks
    try:
        yield
    finally:
        del inner.get_placeholder_mask


@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_features_encoded_once_give_the_forward_s_loss(
    family: str, copies: int, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """``_image_model_inputs`` (the trainers' encode-once step) on a batch with a video, and with an image too: the
    same loss as the pixels through the model's forward, repeated ``copies`` times (DPO's chosen + rejected). The
    videos go through the model's ``get_video_features``, or its ``get_image_features`` with the images where their
    frames join the images' inputs."""
    ckpt = tiny_checkpoint(family)
    mapper, processor = load_adapter(ckpt)
    # float64 where the model allows it; mixture-of-experts layers run grouped matmuls of float32 at most
    dtype = torch.float32 if read_spec(family).get("moe") else torch.float64
    model = mapper.model.from_pretrained(ckpt, dtype=dtype).eval()
    model.requires_grad_(False)
    model.get_submodule(mapper.model.language_model_path).requires_grad_(True)
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(image)
    video = video_ref(write_clip(tmp_path, "clip.mp4", count=max(8, least_frames(family)), fps=4))
    answer = {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}
    image_part, video_part = {"type": "image", "text": None}, {"type": "video", "text": None}
    if read_spec(family)["video"].get("with_images", True):  # the image and the video in one row
        first = [{"messages": [{"role": "user", "content": [image_part, video_part]}, answer], "images": [str(image)]}]
        first[0]["videos"] = [video]
    else:  # a processor of one kind per call (spec video.with_images: false): a video row and an image row
        first = [
            {"messages": [{"role": "user", "content": [video_part]}, answer], "images": [], "videos": [video]},
            {"messages": [{"role": "user", "content": [image_part]}, answer], "images": [str(image)], "videos": []},
        ]
    first = [{**row, "source": f"d:{n + 1}"} for n, row in enumerate(first)]
    batch = dict(mapper.sft_collator(processor)(first * copies))
    once = dict(mapper.sft_collator(processor)(first))
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        if key in batch:  # the rows' tokens, the visual inputs of the first copy (as DPO's collator holds them)
            once[key] = batch[key]

    with torch.no_grad(), _video_tokens_apart(model, processor, batch):
        expected = model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}).loss

    encoder = ImageEncodingMixin()
    encoder._bind_adapter(mapper.model, processor)
    calls = []
    pixels = video_pixels(family)
    encode = "get_video_features" if pixels else "get_image_features"
    original = getattr(model.model, encode)
    setattr(model.model, encode, lambda *a, **k: calls.append(1) or original(*a, **k))
    encoded = encoder._image_model_inputs(model, once, copies=copies)
    assert len(calls) == 1 and encoded["pixel_values"] is None and encoded.get(pixels or "pixel_values") is None
    # videos expanded into the image token (with inputs of their own, or among the images') reach the forward with
    # the images' features, in token order
    merged = processor.video_tokens_need_types() or not pixels
    assert set(encoded["mm_encoder_outputs"]) == ({"image"} if merged else {"image", "video"})
    with torch.no_grad():
        got = model(
            **{k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in encoded.items()}
        )
    assert len(calls) == 1  # the forward encoded nothing again
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.loss, expected, rtol=tolerance, atol=tolerance)
    assert expected.item() > 0


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_online_algorithms_refuse_a_video_row_by_name(
    algorithm: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    family = VIDEO_FAMILIES[0]
    data = _data(tmp_path, "dpo", family)
    argv = train_argv(algorithm, tiny_checkpoint(family), data, tmp_path / "out")
    argv += ["--reward_funcs", f"{REWARDS}:constant_reward"]
    with pytest.raises(DataError) as excinfo:
        build_trainer(algorithm, *parse(algorithm, argv))
    refusal = (
        f"1 video(s), but {algorithm.upper()} generates answers from prompts with images only: it takes no video "
        "yet; remove the video, or pass --skip_invalid_rows to skip (and count) such rows"
    )
    assert excinfo.value.errors == [(f"{data}:1", refusal), (f"{data}:2", refusal)]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_dpo_pairs_with_videos_share_their_prompt(
    family: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    """A pair whose prompt holds a video runs as one row over its prompt (the video's tokens and M-RoPE positions
    once) with the loss of two rows, where the family shares prompts; the vision tower runs once per loss (the
    videos encoded once)."""
    argv = train_argv("dpo", tiny_checkpoint(family), _data(tmp_path, "dpo", family), tmp_path / "out")
    trainer, _ = build_trainer("dpo", *parse("dpo", argv))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    layout = trainer.pair_layout(trainer.model, batch)
    if not trainer.vl_model.shares_prompt or trainer.aux_loss_enabled:  # (the router loss reads the rows' mask)
        assert layout is None  # spec shared_prompt: false (Qwen3.5's state-carrying layers), or a router loss
    else:
        assert layout is not None and layout.tokens < int(batch["attention_mask"].sum())
    runs = []
    tower = trainer.vl_model.get_vision_tower(trainer.model)
    tower.register_forward_hook(lambda *_: runs.append(1))
    trainer.model.eval()
    losses = []
    for shared in (True, False):
        trainer.args.shared_prompt = shared
        runs.clear()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, dict(batch)).item())
        assert len(runs) == 1  # policy pass; the reference log-probs are TRL's, computed apart
    assert math.isfinite(losses[0]) and losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)


def test_generate_refuses_a_video_row_by_name(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """``resonance generate`` reads its prompts before the model loads: a video row is an error naming it (exit 2)."""
    from typer.testing import CliRunner

    from resonance.cli import app

    family = VIDEO_FAMILIES[0]
    data = _data(tmp_path, "dpo", family)
    args = ["generate", "--model_name_or_path", str(tiny_checkpoint(family))]
    result = CliRunner().invoke(app, [*args, "--data_path", str(data), "--output", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 2, result.output
    refusal = "1 video(s), but `resonance generate` takes no video yet; remove the video, or pass --skip_invalid_rows"
    assert f"{data}:1: {refusal}" in result.output and f"{data}:2: {refusal}" in result.output
    assert not (tmp_path / "out.jsonl").exists()
