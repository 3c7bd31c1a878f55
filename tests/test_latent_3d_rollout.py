"""LVDM's base model on 3D-autoencoder latents (He et al. 2022, Sec. 3; issue 21): the prediction stage trained from
scratch on a cache with 4 video frames per latent frame (no image LDM), the stages still refused on 3D latents, and
the rollout of a 3D-autoencoder + prediction stack (video frames, per-video-frame labels, streamed decode equal to the
autoencoder's one-shot chunked decode, boxes per latent frame reduced as the cache reduces them). Tiny preset,
randomly initialised or few-step models: mechanics only, not image quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from drivesim.cli.main import main
from drivesim.datasets.clips import Box, load_clip, read_annotation, read_manifest, read_video, write_synthetic_dataset
from drivesim.datasets.latent_cache import LatentCache
from drivesim.datasets.scenario import Scenario, load_scenario, save_scenario

import drivesim
from drivesim.autoencoder import AutoencoderKL, VideoAutoencoder3D
from drivesim.configs import get_preset, override
from drivesim.errors import ConfigError
from drivesim.pipeline.rollout import conditioned_track_ids, make_cond_fn, pack_conditioning
from drivesim.pipeline.stages import get_stage
from drivesim.rollout import (
    Rollout,
    RolloutConfig,
    init_checkpoint_dir,
    load_models,
    make_plan,
    resolve_fps,
    to_uint8,
)
from drivesim.training.checkpoint import save_model

H, W = 32, 64
SETS_3D = ["--set", "latent_space=3d", "--set", "prediction.frame_stride=1"]


def _preset_3d(frame_stride: int = 1):
    return override(override(get_preset("tiny"), "latent_space", "3d"), "prediction.frame_stride", str(frame_stride))


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(root, 3D cache, kl-f8 cache) of 2 clips of 20 frames: 5 latent frames each on 3D latents (2 train windows)."""
    from drivesim.pipeline.encode import encode_dataset

    root = tmp_path_factory.mktemp("latent3d")
    write_synthetic_dataset(root / "data", clips=2, frames=20, size=(H, W), splits=("train", "val"))
    tiny = get_preset("tiny")
    torch.manual_seed(0)
    save_model(VideoAutoencoder3D(tiny.autoencoder_3d), root / "ae3d")
    save_model(AutoencoderKL(tiny.autoencoder), root / "ae")
    quiet = {"dtype": "float32", "log": lambda _: None}
    c3d = encode_dataset(root / "ae3d", root / "data", root / "c3d.h5", **quiet)["path"]
    ckl = encode_dataset(root / "ae", root / "data", root / "ckl.h5", **quiet)["path"]
    return root, Path(c3d), Path(ckl)


# ------------------------------------------------------------------------------------------------------- training


def test_prediction_trains_the_whole_unet_from_scratch_on_3d_latents(caches):
    root, c3d, _ = caches
    out = root / "runs" / "pred3d"
    assert main(["train", "prediction", "--preset", "tiny", *SETS_3D, "--data", str(c3d), "--out", str(out),
                 "--max-steps", "3", "--no-progress"]) == 0
    trained = drivesim.load(out / "model")
    cfg = trained.config
    assert cfg.temporal.train_spatial and cfg.frame_stride == 1 and cfg.box_reduction == "union"
    assert cfg.data_fps == 10.0 and cfg.encoder_id == LatentCache(c3d).encoder_id
    # the initial weights, as train_stage builds them (global RNG seeded with train.seed first)
    preset = _preset_3d()
    torch.manual_seed(preset.train["prediction"].seed)
    fresh, dataset, collate = get_stage("prediction").build(preset, c3d)
    spatial = {f"unet.{n}" for n in fresh.unet.spatial_parameter_names}
    assert all(p.requires_grad for p in fresh.parameters())  # nothing frozen: no image LDM
    # 3 optimizer steps moved spatial and temporal layers (not all yet: the layers feeding a zero-initialised output
    # conv or a GLIGEN gate get gradient only once that has moved)
    init = dict(fresh.named_parameters())
    moved = {n for n, p in trained.named_parameters() if not torch.equal(p, init[n])}
    assert "unet.spatial.input_blocks.0.layers.0.weight" in moved and moved & spatial and moved - spatial
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    # and a loss of the trained model sends gradient into every parameter, spatial and temporal
    batch = collate([dataset[0], dataset[1]])
    assert batch["latents"].shape == (2, 4, 4, H // 8, W // 8)  # 4 latent frames = 16 video frames
    torch.manual_seed(1)
    trained.train().loss(batch)[0].backward()
    got = {n for n, p in trained.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == set(init) and len(spatial) > 100 and len(got - spatial) > 50


def test_kl_f8_prediction_still_requires_the_image_ldm(caches):
    _, _, ckl = caches
    with pytest.raises(ConfigError, match="image_ldm: required for the prediction stage"):
        get_stage("prediction").build(get_preset("tiny"), ckl)


def test_what_3d_latents_do_not_support_is_refused_naming_the_field(caches):
    _, c3d, ckl = caches
    with pytest.raises(ConfigError, match=r"prediction\.frame_stride: 4: on latent_space '3d'"):
        get_stage("prediction").build(_preset_3d(4), c3d)
    for stage in ("image_ldm", "interpolation"):
        with pytest.raises(ConfigError, match=rf"latent_space: '3d': the {stage} stage trains on kl-f8 latents only"):
            get_stage(stage).build(_preset_3d(), c3d, **({"image_ldm": "unused"} if stage == "interpolation" else {}))
    with pytest.raises(ConfigError, match=r"frames_per_latent.*'3d' has 4"):
        get_stage("prediction").build(_preset_3d(), ckl)


# ------------------------------------------------------------------------------------------------------- rollout


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stack3d")
    init_checkpoint_dir(root / "ckpt", "tiny", seed=0, upsampler=False, latent_space="3d")
    # the car moves a pixel a frame: its labels differ from frame to frame, its union box covers four of them
    frames = [[Box("1", "car", 5 + k % 12, 10, 25 + k % 12, 26), Box("2", "pedestrian", 40, 8, 46, 24)]
              for k in range(15)]
    save_scenario(Scenario(fps=10.0, width=W, height=H, night=1, crowdedness=1, frames=frames), root / "s.json")
    return root / "ckpt", root / "s.json"


def _fake_3d_models(pred_stride: int = 1, clip: int = 4):
    ae = SimpleNamespace(frames_per_latent=4, config=SimpleNamespace(decode_chunk_frames=2, decode_chunk_overlap=1))
    pred = SimpleNamespace(config=SimpleNamespace(frame_stride=pred_stride, num_frames=clip))
    return SimpleNamespace(autoencoder=ae, prediction=pred, interpolation=None, image_ldm=None)


def test_3d_plan_arithmetic_and_a_strided_prediction_model_is_refused():
    plan = make_plan(_fake_3d_models(), RolloutConfig(), 30, (H, W))
    # 30 frames: 8 latent frames (the last decodes 2 frames too many, dropped); clips of 4 from S = 0, then + 2 each
    assert (plan.num_latents, plan.num_keys, plan.key_spacing, plan.stages) == (8, 8, 1, ())
    assert (plan.context_first, plan.context_later, plan.image_key, plan.num_units) == (0, 2, False, 3)
    assert plan.decode_windows[0] == (0, 2) and plan.decode_windows[-1] == (6, 8)
    assert plan.cond_frames % 4 == 0 and plan.cond_frames >= 4 * (plan.num_keys + 1)
    with pytest.raises(ConfigError, match=r"prediction\.frame_stride: 4: on 3D latents"):
        make_plan(_fake_3d_models(pred_stride=4), RolloutConfig(), 30, (H, W))


def test_3d_stack_has_no_image_ldm_and_no_interpolation(stack):
    models = load_models(stack[0])
    assert models.frames_per_latent == 4 and models.image_ldm is None and models.interpolation is None
    assert resolve_fps(RolloutConfig(), models).fps == 10.0  # every video frame of the 10 fps training clips


def test_3d_rollout_writes_video_frames_with_per_frame_labels(stack, tmp_path):
    ckpt, scen = stack
    out = tmp_path / "r"
    # 24 frames = 6 latent frames: an unconditional clip of 4, then one continued from 2 context latent frames
    assert main(["rollout", "--scenario", str(scen), "--ckpt-dir", str(ckpt), "--frames", "24", "--out", str(out),
                 "--quiet", "--set", "steps=1"]) == 0
    assert read_video(out / "rollout.mp4").shape == (24, H, W, 3)
    ann = read_annotation(out / "rollout.json")
    assert len(ann.frames) == 24
    # labels per video frame (the scenario looped past its 15 frames), not the per-latent-frame union
    used = load_scenario(out / "scenario.json")
    assert [[(b.cls, b.x1, b.x2) for b in f] for f in ann.frames] == [[(b.cls, b.x1, b.x2) for b in f]
                                                                      for f in used.frames]
    assert [next(b.x1 for b in f if b.cls == "car") for f in ann.frames[:4]] == [5, 6, 7, 8]
    record = json.loads((out / "rollout_config.json").read_text())
    plan = record["plan"]
    assert plan["frames_per_latent"] == 4 and plan["num_keys"] == 6 and plan["stages"] == []
    assert plan["num_units"] == 2 and record["summary"]["frames_written"] == 24
    keys = np.concatenate([np.load(f) for f in sorted((out / "latents").glob("keys_*.npy"))])
    assert keys.shape == (6, 4, H // 8, W // 8)
    manifest = read_manifest(out)
    assert [c.clip_id for c in manifest.clips] == ["rollout"]


def test_streamed_3d_decode_equals_the_autoencoders_chunked_decode(stack, tmp_path):
    """10 frames (not a multiple of 4): 3 latent frames, decode windows (0, 2), (1, 3) cross-faded, 10 written."""
    ckpt, scen = stack
    models = load_models(ckpt)
    cfg = resolve_fps(RolloutConfig(steps=1), models)
    segments: list[np.ndarray] = []
    scenario = Scenario(fps=10.0, width=W, height=H, night=0, crowdedness=1,
                        frames=[[Box("1", "car", 5 + k, 10, 25 + k, 26)] for k in range(40)])
    cond_fn = make_cond_fn(scenario, 8, 4, "union")
    rollout = Rollout(models, cfg, cond_fn, 10, tmp_path / "r", seed=3,
                      segment_writer=lambda p, f, fps: segments.append(f), resolution=(H, W))
    assert rollout.plan.decode_windows == ((0, 2), (1, 3))
    summary = rollout.run()
    assert summary["complete"] and summary["frames_written"] == 10
    written = np.concatenate(segments)
    latents = torch.from_numpy(np.concatenate([np.load(f) for f in sorted((tmp_path / "r" / "latents").glob(
        "frames_*.npy"))]))
    assert latents.shape == (3, 4, H // 8, W // 8)
    with torch.no_grad():
        one_shot = models.autoencoder.decode_scaled(latents[None], num_frames=2)[0]
    assert one_shot.shape[0] == 12
    diff = np.abs(written.astype(int) - to_uint8(one_shot[:10]).astype(int))
    assert written.shape == (10, H, W, 3) and diff.max() <= 1


def test_rollout_reduces_boxes_per_latent_frame_as_the_cache_does(caches):
    root, c3d, _ = caches
    cache = LatentCache(c3d)
    assert cache.box_reduction == "union"
    for entry in read_manifest(root / "data").clips:
        _, ann = load_clip(entry)
        scenario = Scenario.from_clip(ann)
        got = pack_conditioning(scenario, cache.max_boxes, 4, "union")
        want = cache.read_clip(entry.clip_id)
        np.testing.assert_array_equal(got.boxes, want["boxes"])
        np.testing.assert_array_equal(got.classes, want["classes"])
        np.testing.assert_array_equal(got.box_mask, want["box_mask"])
        np.testing.assert_array_equal(got.track_ids, want["track_ids"])
        # what the rollout's conditioning function hands the prediction model for latent frames 1, 2
        cond = make_cond_fn(scenario, cache.max_boxes, 4, "union")([1, 2])
        np.testing.assert_array_equal(cond.boxes[0].numpy(), want["boxes"][1:3])
        # each video frame is marked with the tracks of its latent frame's boxes
        kept = conditioned_track_ids(scenario, 16, cache.max_boxes, 4, "union")
        assert kept[5] == kept[7] == {b.track_id for k in range(4, 8) for b in ann.frames[k]}
    cache.close()
