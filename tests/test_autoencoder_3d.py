"""LVDM's 3D autoencoder (`video_autoencoder_3d`): shapes, repeat padding's shift-equivariance (and that zero padding
breaks it at the boundary), KL, one step through the shared loop, checkpoint round trip, bad input, the latent cache
with 4 video frames per latent frame and its box reduction, the preset's latent_space. Tiny configs only (seconds).
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch
from drivesim.bbox_conditioning.latent_frames import group_boxes
from drivesim.cli.main import main
from drivesim.datasets.clips import load_clip, pack_annotation, read_annotation, read_manifest, write_synthetic_dataset
from drivesim.datasets.latent_cache import LatentCache, LatentClipDataset
from drivesim.datasets.transforms import frames_to_tensor

import drivesim
from drivesim.autoencoder import VideoAutoencoder3D
from drivesim.autoencoder.networks_3d import PadConv3d, ResBlock3D
from drivesim.configs import Autoencoder3DConfig, Preset, dump_yaml, get_preset, load_yaml, override
from drivesim.errors import CheckpointError, ConfigError, DataError
from drivesim.training.checkpoint import load_model, save_model

H, W = 32, 64


def _cfg(**kw) -> Autoencoder3DConfig:
    return dataclasses.replace(get_preset("tiny").autoencoder_3d, **kw)


def _frames(b=2, t=8, h=H, w=W, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, h, w, generator=g) * 2 - 1


def _perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Non-trivial weights everywhere (biases and norm affines too, which start at 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def ae() -> VideoAutoencoder3D:
    torch.manual_seed(0)
    return VideoAutoencoder3D(_cfg()).eval()


# ---------------------------------------------------------------------------------------------------- shapes


def test_shapes_t_over_4_and_decode_inverts(ae):
    x = _frames()
    post = ae.encode(x)
    assert ae.frames_per_latent == 4
    assert post.mean.shape == (2, 2, 4, H // 8, W // 8) and post.logvar.shape == post.mean.shape
    assert post.kl().shape == (2, 2)
    assert ae.decode(post.mode()).shape == x.shape
    assert ae(x).shape == x.shape
    assert ae.encode(_frames(b=1, t=4)).mean.shape == (1, 1, 4, H // 8, W // 8)
    z = torch.randn(1, 3, 4, H // 8, W // 8)
    assert ae.decode(z).shape == (1, 12, 3, H, W)
    assert ae.decode_scaled(z).shape == (1, 12, 3, H, W)
    assert ae.encode_scaled(x, sample=False).shape == post.mean.shape
    # chunked decoding (2 latent frames per chunk, 1 shared) covers all 4 t frames; a chunk >= t is one go, bit for bit
    with torch.no_grad():
        long = torch.randn(1, 5, 4, H // 8, W // 8)
        assert ae.decode(long, num_frames=2).shape == (1, 20, 3, H, W)
        assert torch.equal(ae.decode(long, num_frames=5), ae._decode_frames(long))


# ---------------------------------------------------------------------------------------------------- repeat padding


def _static_clip_agrees(block: torch.nn.Module, x: torch.Tensor) -> None:
    """A clip whose frames are all the same gives the same output at every frame, the first and last included:
    with repeat padding the padded frames equal the real ones, so nothing marks the clip's ends."""
    static = x[:, :, :1].expand(-1, -1, x.shape[2], -1, -1).contiguous()
    with torch.no_grad():
        y = block(static)
    for k in range(y.shape[2]):
        assert torch.equal(y[:, :, k], y[:, :, 0]), f"frame {k} differs from frame 0"


@pytest.mark.parametrize("padding_mode", ["replicate", "zeros"])
def test_block_is_shift_equivariant_away_from_the_boundaries(padding_mode):
    """ResBlock3D (two 3x3x3 convs, reach 2 frames each side): shifting the clip by k frames shifts the output by k
    wherever neither the clip ends nor the wrap of `torch.roll` is within reach. Same shapes, so the same kernels run
    on the same numbers: bit for bit. Interior equivariance holds for zero padding too (the boundary test is below)."""
    torch.manual_seed(0)
    block = ResBlock3D(8, 16, padding_mode=padding_mode).eval()
    _perturb(block)
    x = torch.randn(2, 8, 12, 8, 16)
    k, reach, t = 3, 2, 12
    with torch.no_grad():
        y, y_shift = block(x), block(torch.roll(x, k, dims=2))
    assert torch.equal(y_shift[:, :, k + reach:t - reach], y[:, :, reach:t - k - reach])
    assert not torch.equal(y_shift[:, :, :k], y[:, :, t - k:])  # the wrapped frames are not: the check can fail


def test_repeat_padding_static_clip_boundary_and_zero_padding_fails():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 8, 16)
    block = ResBlock3D(8, 16, padding_mode="replicate").eval()
    _perturb(block)
    _static_clip_agrees(block, x)
    zero = ResBlock3D(8, 16, padding_mode="zeros").eval()
    zero.load_state_dict(block.state_dict())
    with pytest.raises(AssertionError, match="differs from frame 0"):
        _static_clip_agrees(zero, x)


@pytest.mark.parametrize("padding_mode", ["replicate", "zeros"])
def test_one_conv_sees_a_repeated_first_frame_as_its_padding(padding_mode):
    """One repeat-padded conv cannot tell a clip from the same clip shifted by k frames with its first frame repeated
    k times before it: at every frame but the last (whose right neighbour was cut off) the outputs agree bit for bit,
    the first frame included. Zero padding marks the clip's start, so frame 0 differs. (Deeper, the padding of
    intermediate features is not the features of repeated frames; `test_static_clip_...` covers the whole network.)"""
    torch.manual_seed(0)
    conv = PadConv3d(4, 6, 3, padding_mode=padding_mode).eval()
    _perturb(conv, 0.1)
    x = torch.randn(1, 4, 9, 8, 8)
    k = 3
    shifted = torch.cat([x[:, :, :1].expand(-1, -1, k, -1, -1), x[:, :, :-k]], dim=2)
    with torch.no_grad():
        y, y_shift = conv(x), conv(shifted)
    same_at_start = torch.equal(y_shift[:, :, k], y[:, :, 0])
    assert torch.equal(y_shift[:, :, k + 1:-1], y[:, :, 1:-k - 1])  # interior: any padding
    assert same_at_start == (padding_mode == "replicate")


def test_static_clip_encodes_and_decodes_to_static_frames():
    model = VideoAutoencoder3D(_cfg()).eval()
    _perturb(model, 0.02)
    static = _frames(b=1, t=1).expand(-1, 16, -1, -1, -1)
    with torch.no_grad():
        z = model.encode(static).mean
        assert z.shape[1] == 4 and all(torch.equal(z[:, j], z[:, 0]) for j in range(4))
        rec = model._decode_frames(z)
        assert all(torch.equal(rec[:, k], rec[:, 0]) for k in range(16))


def test_encoder_and_decoder_shift_equivariant_by_latent_frames():
    """The whole encoder: rolling the clip by 8 video frames rolls its latents by 2, bit for bit, for latents out of
    reach of the clip's ends and the roll's wrap. The tiny encoder's latent j sees video frames 4j - 34 .. 4j + 37
    (conv_in, 3x3x3 convs and the stride-2 kernel-4 downsamplings): 10 latent frames each side. Per-frame group norm is
    what makes this exact: statistics over the clip would tie every latent to every frame. The decoder likewise:
    rolling the latents by 1 rolls the frames by 4 (its reach: under 16 latent frames)."""
    torch.manual_seed(0)
    model = VideoAutoencoder3D(_cfg()).eval()
    _perturb(model, 0.02)
    x = _frames(b=1, t=128, h=8, w=16)  # 32 latent frames
    with torch.no_grad():
        z, z_roll = model.encode(x).mean, model.encode(torch.roll(x, 8, dims=1)).mean
    reach = 10
    assert torch.equal(z_roll[:, 2 + reach:32 - reach], z[:, reach:30 - reach])
    assert not torch.equal(z_roll[:, 2:4], z[:, :2])  # the clip's start is within reach there: the check can fail
    lat = torch.randn(1, 48, 4, 1, 2)
    with torch.no_grad():
        f, f_roll = model._decode_frames(lat), model._decode_frames(torch.roll(lat, 1, dims=1))
    reach = 16
    assert torch.equal(f_roll[:, 4 * (1 + reach):4 * (48 - reach)], f[:, 4 * reach:4 * (47 - reach)])


# ---------------------------------------------------------------------------------------------------- loss


def test_kl_matches_torch_distributions_and_counts_four_frames_of_pixels():
    model = VideoAutoencoder3D(_cfg(kl_weight=1.0, disc_start=10)).eval()
    x = _frames(b=2, t=8)
    post = model.encode(x)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(post.mean, post.std), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(-3, -2, -1))
    torch.testing.assert_close(post.kl(), ref, atol=1e-4, rtol=1e-5)
    # loss = L1 + kl_weight * KL per latent frame / (pixel values it stands for: 4 frames x 3 x H x W)
    torch.manual_seed(3)
    loss, logs = model.loss({"frames": x})
    torch.manual_seed(3)
    z = model.encode(x).sample()
    rec = model._decode_frames(z)
    expected = (x - rec).abs().mean() + ref.mean() / (4 * 3 * H * W)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert logs["kl"] == pytest.approx(ref.mean().item(), rel=1e-4)


def test_gan_turns_on_after_disc_start_with_the_video_discriminator():
    torch.manual_seed(0)
    model = VideoAutoencoder3D(_cfg(disc_start=1)).train()
    x = _frames(b=1, t=8)
    _, logs0 = model.loss({"frames": x})
    loss, logs1 = model.loss({"frames": x})
    assert "d_loss" not in logs0 and "d_loss" in logs1 and logs1["d_weight"] > 0
    loss.backward()
    assert all(p.grad is not None for p in model.discriminator.parameters())
    groups = model.param_groups(get_preset("tiny").train["autoencoder_3d"])
    assert [g["name"] for g in groups] == ["autoencoder", "discriminator"]


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae3d")
    # 10 frames: the cache encodes the first 8 (2 latent frames) and leaves 2 out
    write_synthetic_dataset(root / "data", clips=2, frames=10, size=(H, W), splits=("train", "val"))
    return root


def test_training_steps_through_the_shared_loop(data, capsys):
    runs = data / "runs"
    assert main(["train", "autoencoder_3d", "--preset", "tiny", "--data", str(data / "data"), "--out",
                 str(runs / "ae3d"), "--max-steps", "3", "--no-progress"]) == 0
    trained = drivesim.load(runs / "ae3d" / "model")
    assert type(trained) is VideoAutoencoder3D and int(trained.global_step) == 3  # disc on from step 2
    torch.manual_seed(get_preset("tiny").train["autoencoder_3d"].seed)  # what train_stage seeds before building
    fresh = VideoAutoencoder3D(_cfg())
    moved = {n for n, p in trained.named_parameters() if not torch.equal(p, dict(fresh.named_parameters())[n])}
    assert any(n.startswith("encoder.") for n in moved) and any(n.startswith("decoder.") for n in moved)
    assert any(n.startswith("discriminator.") for n in moved)
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    assert (runs / "ae3d" / "config-autoencoder_3d.yaml").is_file()
    # a clip length that is not a multiple of 4 is refused before anything is written
    assert main(["train", "autoencoder_3d", "--preset", "tiny", "--data", str(data / "data"), "--out",
                 str(runs / "bad"), "--opt", "frames=6", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "frames" in err and "multiple of 4" in err and not (runs / "bad" / "checkpoints").exists()


def test_final_loss_is_finite_and_no_step_is_skipped(data):
    from drivesim.pipeline.train import train_stage, with_train_overrides

    preset = with_train_overrides(get_preset("tiny"), "autoencoder_3d", max_steps=1)
    result = train_stage("autoencoder_3d", preset, data / "data", data / "runs" / "one", progress=False)
    assert result.step == 1 and result.bad_steps == 0 and np.isfinite(result.final_loss)


def test_checkpoint_round_trip_through_drivesim_load(tmp_path):
    model = VideoAutoencoder3D(_cfg()).eval()
    _perturb(model, 0.02)
    model.set_scale_factor(0.37)
    save_model(model, tmp_path / "ae3d")
    loaded = drivesim.load(tmp_path / "ae3d")
    assert type(loaded) is VideoAutoencoder3D and loaded.config == model.config
    assert loaded.config.scale_factor == 0.37
    x = _frames(b=1, t=8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.encoder_fingerprint() == model.encoder_fingerprint()
    assert load_model(tmp_path / "ae3d", "video_autoencoder_3d") is not None
    with pytest.raises(CheckpointError, match="video_autoencoder_3d"):
        load_model(tmp_path / "ae3d", "autoencoder_kl")  # what the rollout and the video decoder stage ask for


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (torch.zeros(1, 6, 3, 32, 64), r"6 frames.*multiple of 4.*\(1, 6, 3, 32, 64\)"),
        (torch.zeros(1, 0, 3, 32, 64), r"0 frames.*multiple of 4"),
        (torch.zeros(1, 8, 4, 32, 64), "channels"),
        (torch.zeros(1, 8, 3, 32, 60), "multiple of 8"),
        (torch.zeros(8, 3, 32, 64), "expected"),
        (torch.full((1, 8, 3, 32, 64), 1.5), "outside"),
    ],
)
def test_bad_input_is_one_line_data_error(ae, frames, match):
    for call in (ae.encode, lambda f: ae.loss({"frames": f})):
        with pytest.raises(DataError, match=match) as e:
            call(frames)
        assert "\n" not in str(e.value)


def test_bad_latents_and_configs(ae):
    with pytest.raises(DataError, match="latents"):
        ae.decode(torch.zeros(1, 2, 3, 4, 8))
    with pytest.raises(ConfigError, match="channel_mult"):
        VideoAutoencoder3D(_cfg(channel_mult=(1, 2)))
    with pytest.raises(ConfigError, match="temporal_downsample"):
        VideoAutoencoder3D(_cfg(temporal_downsample=(True, True)))
    with pytest.raises(ConfigError, match="temporal_downsample"):
        VideoAutoencoder3D(_cfg(temporal_downsample=(False, False, False)))
    with pytest.raises(ConfigError, match="rec_loss"):
        VideoAutoencoder3D(_cfg(rec_loss="l3"))
    assert _cfg(temporal_downsample=(True, True, True)).frames_per_latent == 8


# ---------------------------------------------------------------------------------------------------- presets


def test_preset_latent_space_option(tmp_path):
    for name in ("tiny", "cpu-small", "paper-512x1024"):
        p = get_preset(name)
        assert p.latent_space == "kl-f8" and p.frames_per_latent == 1 and "autoencoder_3d" in p.train
        assert p.autoencoder_3d.frames_per_latent == 4
        with torch.device("meta"):  # every preset's block builds (the paper one without allocating)
            VideoAutoencoder3D(p.autoencoder_3d)
    p3 = override(get_preset("tiny"), "latent_space", "3d")
    assert p3.latent_space == "3d" and p3.frames_per_latent == 4
    with pytest.raises(ConfigError, match="latent_space"):
        override(get_preset("tiny"), "latent_space", "2d")
    assert load_yaml(Preset, dump_yaml(p3, tmp_path / "p.yaml")) == p3
    # a preset YAML written before the 3D autoencoder existed still loads (kl-f8, default block)
    old = tmp_path / "old.yaml"
    dump_yaml(get_preset("tiny"), old)
    text = old.read_text()
    text = text[:text.index("latent_space:")]
    old.write_text(text)
    loaded = load_yaml(Preset, old)
    assert loaded.latent_space == "kl-f8" and loaded.autoencoder_3d == Autoencoder3DConfig()


# ---------------------------------------------------------------------------------------------------- latent cache


def _naive_union(ann, group: int, f: int = 4) -> dict[str, tuple]:
    """Track -> (x1, y1, x2, y2) normalised, the min/max over frames [group f, (group + 1) f), computed directly."""
    out: dict[str, list] = {}
    for frame in ann.frames[group * f:(group + 1) * f]:
        for b in frame:
            u = out.setdefault(b.track_id, [b.x1, b.y1, b.x2, b.y2])
            u[:] = [min(u[0], b.x1), min(u[1], b.y1), max(u[2], b.x2), max(u[3], b.y2)]
    return {k: (v[0] / ann.width, v[1] / ann.height, v[2] / ann.width, v[3] / ann.height) for k, v in out.items()}


def test_group_boxes_union_and_middle():
    frames = [[(0, 1, 10.0, 10.0, 20.0, 20.0)], [(0, 1, 12.0, 9.0, 22.0, 19.0)],
              [(0, 1, 14.0, 11.0, 24.0, 21.0), (5, 2, 0.0, 0.0, 4.0, 4.0)], [(0, 1, 16.0, 10.0, 26.0, 20.0)]]
    assert group_boxes(frames, 4, "union") == [[(0, 1, 10.0, 9.0, 26.0, 21.0), (5, 2, 0.0, 0.0, 4.0, 4.0)]]
    assert group_boxes(frames, 4, "middle") == [frames[2]]
    assert group_boxes(frames[:1] * 8, 4, "union") == [frames[0], frames[0]]
    with pytest.raises(ValueError, match="groups"):
        group_boxes(frames[:3], 4)
    with pytest.raises(ValueError, match="reduction"):
        group_boxes(frames, 4, "first")


@pytest.fixture(scope="module")
def cached(data):
    from drivesim.pipeline.encode import encode_dataset

    torch.manual_seed(0)
    save_model(VideoAutoencoder3D(_cfg()), data / "ae")
    union = encode_dataset(data / "ae", data / "data", data / "union.h5", dtype="float32", log=lambda _: None)
    middle = encode_dataset(data / "ae", data / "data", data / "middle.h5", dtype="float32", box_reduction="middle",
                            scale="keep", log=lambda _: None)
    return data, union, middle


def test_cache_records_frames_per_latent_and_the_box_reduction(cached):
    root, union, middle = cached
    assert union["frames_per_latent"] == 4
    model = drivesim.load(root / "ae")
    entries = read_manifest(root / "data").clips
    # scale factor from consecutive train frames (one 8-frame clip: the only train clip's first 8), written back
    with torch.no_grad():
        train = model.encode(frames_to_tensor(load_clip(entries[0])[0][:8])[None]).mean
    assert union["scale_factor"] == model.config.scale_factor == pytest.approx(1 / train.double().std().item(),
                                                                              rel=1e-6)
    with h5py.File(union["path"]) as f:
        assert f.attrs["format_version"] == 2 and f.attrs["frames_per_latent"] == 4
        assert f.attrs["box_reduction"] == "union"
        for entry in entries:
            g = f[f"clips/{entry.clip_id}"]
            assert g["latents"].shape == (2, 4, H // 8, W // 8)
            assert g.attrs["num_video_frames"] == 8 and g.attrs["source_frames"] == 10 and g.attrs["fps"] == 10.0
            frames, ann = load_clip(entry)
            with torch.no_grad():
                expected = model.encode(frames_to_tensor(frames[:8])[None]).mean[0]
            np.testing.assert_allclose(g["latents"][()], expected.numpy(), atol=1e-6)
            # boxes per latent frame: the union of each track's boxes over its 4 frames
            for j in range(2):
                mask = g["box_mask"][j]
                ids = {v: k for k, v in enumerate(dict.fromkeys(b.track_id for fr in ann.frames for b in fr))}
                got = {int(t): tuple(b) for t, b in zip(g["track_ids"][j][mask], g["boxes"][j][mask], strict=True)}
                want = {ids[k]: v for k, v in _naive_union(ann, j).items()}
                assert got.keys() == want.keys()
                for t in want:
                    np.testing.assert_allclose(got[t], want[t], atol=1e-6)
            # the per-video-frame boxes are kept as they were
            packed = pack_annotation(read_annotation(entry.annotation), 16)
            np.testing.assert_array_equal(g["video_boxes"][()], packed.boxes[:8])
            np.testing.assert_array_equal(g["video_track_ids"][()], packed.track_ids[:8])
    with h5py.File(middle["path"]) as f:
        assert f.attrs["box_reduction"] == "middle"
        g = f[f"clips/{entries[1].clip_id}"]
        np.testing.assert_array_equal(g["boxes"][()], g["video_boxes"][()][[2, 6]])
    cache = LatentCache(union["path"])
    assert cache.frames_per_latent == 4 and cache.box_reduction == "union"
    assert cache.meta[entries[0].clip_id]["num_frames"] == 2
    item = LatentClipDataset(cache, "train", num_frames=2)[0]
    assert item["latents"].shape == (2, 4, H // 8, W // 8) and item["boxes"].shape == (2, 16, 4)


def test_latent_stages_refuse_a_cache_of_another_latent_space(cached):
    from drivesim.pipeline.stages import get_stage

    root, union, _ = cached
    with pytest.raises(ConfigError, match=r"frames_per_latent.*4 video frame.*'kl-f8'"):
        get_stage("image_ldm").build(get_preset("tiny"), union["path"])
    # on 3D latents only the prediction stage exists (tests/test_latent_3d_rollout.py)
    with pytest.raises(ConfigError, match="latent_space: '3d': the image_ldm stage trains on kl-f8 latents only"):
        get_stage("image_ldm").build(override(get_preset("tiny"), "latent_space", "3d"), union["path"])
