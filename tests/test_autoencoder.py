"""KL-f8 autoencoder and video decoder: shapes, KL, scale factor, bad input, alpha = 1 exactness, chunked decoding,
one-step GAN correctness, checkpoint round trip. Tiny configs only (seconds)."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import drivesim
from drivesim.autoencoder import (
    AutoencoderKL,
    DiagonalGaussian,
    VideoAutoencoder,
    chunk_windows,
    compute_scale_factor,
)
from drivesim.autoencoder.metrics import flicker
from drivesim.configs import AutoencoderConfig, TrainConfig, get_preset
from drivesim.discriminators import NLayerDiscriminator, VideoDiscriminator3D, hinge_d_loss
from drivesim.errors import CheckpointError, ConfigError, DataError
from drivesim.nn.temporal import force_alpha_one

H, W = 32, 64


def _cfg(**kw) -> AutoencoderConfig:
    return dataclasses.replace(get_preset("tiny").autoencoder, **kw)


def _frames(b=2, t=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, H, W, generator=g) * 2 - 1


def _randomize_temporal(model: torch.nn.Module, seed: int = 0) -> None:
    """Make the temporal layers non-trivial (as after training) so alpha = 1 has something to switch off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "temporal" in n and "mix_factor" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def ae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(_cfg()).eval()


def test_shapes_and_posterior(ae):
    x = _frames()
    post = ae.encode(x)
    assert post.mean.shape == (2, 3, 4, H // 8, W // 8) and post.logvar.shape == post.mean.shape
    assert post.kl().shape == (2, 3)
    assert ae.decode(post.mode()).shape == x.shape
    assert ae(x).shape == x.shape
    torch.manual_seed(1)
    s1 = post.sample()
    torch.manual_seed(1)
    assert torch.equal(s1, post.sample()) and not torch.equal(s1, post.mode())


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(2, 3, 4, 4, 8), torch.randn(2, 3, 4, 4, 8)
    post = DiagonalGaussian(mean, logvar)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(-3, -2, -1))
    torch.testing.assert_close(post.kl(), ref, atol=1e-4, rtol=1e-5)


def test_scale_factor_from_data_and_scaled_round_trip():
    torch.manual_seed(0)
    model = AutoencoderKL(_cfg()).eval()
    batches = [_frames(seed=s) for s in range(3)]
    s = compute_scale_factor(model, batches, sample=False)
    means = torch.cat([model.encode(b).mode().flatten() for b in batches])
    assert s == pytest.approx(1.0 / means.double().std().item(), rel=1e-6)
    old = model.config
    model.set_scale_factor(s)
    assert model.config.scale_factor == s and old.scale_factor == 1.0  # a new frozen config, old one untouched
    scaled = torch.cat([model.encode_scaled(b, sample=False).flatten() for b in batches])
    assert scaled.std().item() == pytest.approx(1.0, rel=1e-4)
    z = model.encode_scaled(batches[0], sample=False)
    # (mean * s) / s is the mean up to one rounding, which the decoder may amplify: 1.4e-5 seen with AVX2 kernels
    torch.testing.assert_close(model.decode_scaled(z), model.decode(model.encode(batches[0]).mode()), atol=1e-4,
                               rtol=1e-4)
    with pytest.raises(ConfigError):
        model.set_scale_factor(0.0)
    with pytest.raises(DataError):
        compute_scale_factor(model, [])


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (torch.zeros(1, 2, 3, 32, 60), "multiple of 8"),
        (torch.zeros(1, 2, 4, 32, 64), "channels"),
        (torch.zeros(2, 3, 32, 64), "expected"),
        (torch.full((1, 2, 3, 32, 64), 1.5), "outside"),
        (torch.full((1, 2, 3, 32, 64), -1.01), "outside"),
        (torch.full((1, 2, 3, 32, 64), float("nan")), "NaN"),
        (torch.zeros(1, 2, 3, 32, 64, dtype=torch.uint8), "float"),
    ],
)
def test_bad_frames_raise(ae, frames, match):
    with pytest.raises(DataError, match=match):
        ae.encode(frames)
    with pytest.raises(DataError, match=match):
        ae.loss({"frames": frames})


def test_bad_latents_and_configs(ae):
    with pytest.raises(DataError, match="latents"):
        ae.decode(torch.zeros(1, 2, 3, 4, 8))
    with pytest.raises(ConfigError, match="channel_mult"):
        AutoencoderKL(_cfg(channel_mult=(1, 2)))
    with pytest.raises(ConfigError, match="video_decoder"):
        AutoencoderKL(_cfg(video_decoder=True))
    with pytest.raises(ConfigError, match="rec_loss"):
        AutoencoderKL(_cfg(rec_loss="l3"))


def test_video_decoder_latent_channels_must_match_encoder(ae, tmp_path):
    with pytest.raises(CheckpointError, match="latent_channels"):
        VideoAutoencoder.from_image(ae, latent_channels=8)
    other = VideoAutoencoder(_cfg(video_decoder=True, latent_channels=8))
    with pytest.raises(CheckpointError, match="latent_channels"):
        other.attach_to(ae)
    video = VideoAutoencoder.from_image(ae)
    assert video.attach_to(ae) is video
    torch.manual_seed(5)
    stranger = VideoAutoencoder.from_image(AutoencoderKL(_cfg()))
    with pytest.raises(CheckpointError, match="encoder"):
        stranger.attach_to(ae)


def test_video_decoder_with_alpha_one_is_image_decoder_bitwise(ae):
    video = VideoAutoencoder.from_image(ae)
    _randomize_temporal(video)
    z = ae.encode(_frames(t=5)).mode()
    image = ae.decode(z, num_frames=5)
    assert not torch.equal(video.decode(z, num_frames=5), image)  # trained temporal layers do change the output
    with force_alpha_one(video):
        assert torch.equal(video.decode(z, num_frames=5), image)
    fixed = VideoAutoencoder.from_image(ae, temporal_merge="fixed", temporal_alpha_init=1.0)
    _randomize_temporal(fixed)
    assert torch.equal(fixed.decode(z, num_frames=5), image)
    mixed = VideoAutoencoder.from_image(ae, temporal_merge="learned_with_images")
    _randomize_temporal(mixed)
    out = mixed.decode(z, num_frames=5, image_only=torch.tensor([True, False]))
    assert torch.equal(out[0], image[0]) and not torch.equal(out[1], image[1])


def test_video_autoencoder_freezes_encoder_and_spatial_decoder(ae):
    video = VideoAutoencoder.from_image(ae)
    assert not any(p.requires_grad for p in video.encoder.parameters())
    assert not any(p.requires_grad for p in video.decoder.spatial_parameters())
    assert all(p.requires_grad for p in video.decoder.temporal_parameters())
    assert isinstance(video.discriminator, VideoDiscriminator3D)
    groups = video.param_groups(TrainConfig())
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in video.parameters() if p.requires_grad}
    video.train()
    assert not video.encoder.training
    loss, logs = video.loss({"frames": _frames(t=4)})
    loss.backward()
    assert all(p.grad is None for p in video.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in video.decoder.temporal_parameters())
    assert "kl" not in logs
    full = VideoAutoencoder.from_image(ae, video_train_spatial=True)
    assert all(p.requires_grad for p in full.decoder.spatial_parameters())


def test_decoder_only_fine_tune_keeps_the_latent_space(ae):
    """`decoder_only`: one optimizer step moves the decoder and leaves the encoder (so its fingerprint, the latent
    cache and every latent model trained on it) unchanged bit for bit; the decoder learns from posterior means."""
    model = AutoencoderKL(_cfg(decoder_only=True, box_weight=1.0))
    model.load_state_dict(ae.state_dict())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    before = model.encoder_fingerprint()
    decoder_before = copy.deepcopy(model.decoder.state_dict())
    model.train()
    x = _frames(t=1)
    with torch.no_grad():
        rec, post = model._reconstruct_for_loss(x)
    assert post is None
    torch.testing.assert_close(rec, ae._decode_frames(ae.encode(x).mode()))  # same weights, same computation
    opt = torch.optim.Adam(model.param_groups(TrainConfig())[0]["params"], lr=1e-2)
    loss, logs = model.loss({"frames": x})
    assert "kl" not in logs
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    opt.step()
    assert model.encoder_fingerprint() == before
    assert any(not torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())


def test_video_decoder_fine_tunes_on_posterior_mean_or_sample(ae):
    """`video_latents`: "mean" decodes the posterior mean (deterministic, what the latent cache stores), "sample" a
    posterior draw per call (differs between calls)."""
    x = _frames(t=4)
    video = VideoAutoencoder.from_image(ae, video_latents="mean")
    _randomize_temporal(video)
    video.train()
    with torch.no_grad():
        z = ae.encode(x).mode()
        rec1, post = video._reconstruct_for_loss(x)
        rec2, _ = video._reconstruct_for_loss(x)
        assert post is None and torch.equal(rec1, rec2)
        torch.testing.assert_close(rec1, video.decode(z))
        sampled = VideoAutoencoder.from_image(ae, video_latents="sample")
        sampled.load_state_dict(video.state_dict())
        sampled.train()
        assert not torch.equal(sampled._reconstruct_for_loss(x)[0], rec1)
    with pytest.raises(ConfigError, match="video_latents"):
        VideoAutoencoder.from_image(ae, video_latents="median")


def test_video_decoder_temporal_difference_loss(ae):
    """loss = rec + video_temporal_weight * mean |diff_t(rec) - diff_t(x)| (the flicker measure); off at weight 0."""
    x = _frames(t=4)
    video = VideoAutoencoder.from_image(ae, video_latents="mean", video_temporal_weight=2.0, disc_start=10**6)
    _randomize_temporal(video)
    video.eval()
    with torch.no_grad():
        loss, logs = video.loss({"frames": x})
        rec, _ = video._reconstruct_for_loss(x)
    temporal = (rec.diff(dim=1) - x.diff(dim=1)).abs().mean()
    torch.testing.assert_close(logs["temporal"], temporal.item())
    torch.testing.assert_close(loss, (x - rec).abs().mean() + 2.0 * temporal)
    torch.testing.assert_close(temporal.double(), 2 * flicker((rec + 1) / 2, (x + 1) / 2).mean())  # on [-1, 1]
    off = VideoAutoencoder.from_image(ae, video_latents="mean", disc_start=10**6)
    off.load_state_dict(video.state_dict())
    off.eval()
    with torch.no_grad():
        loss0, logs0 = off.loss({"frames": x})
    assert "temporal" not in logs0
    torch.testing.assert_close(loss0, (x - rec).abs().mean())
    with pytest.raises(ConfigError, match="video_temporal_weight"):
        VideoAutoencoder.from_image(ae, video_temporal_weight=-1.0)


def test_chunk_windows_cover_and_overlap():
    assert chunk_windows(5, 8, 2) == [(0, 5)]
    assert chunk_windows(20, 8, 2) == [(0, 8), (6, 14), (12, 20)]
    assert chunk_windows(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (7, 11)]
    for t, c, o in [(11, 4, 1), (40, 8, 2), (9, 8, 3), (17, 5, 0)]:
        win = chunk_windows(t, c, o)
        covered = set()
        for (s, e), (s2, _) in zip(win, win[1:], strict=False):
            assert e - s == c and s2 - s <= c - o and s2 < e + (o == 0)
        for s, e in win:
            covered |= set(range(s, e))
        assert covered == set(range(t))


def test_chunked_decode_equals_unchunked_for_image_decoder(ae):
    z = torch.randn(2, 11, 4, H // 8, W // 8)
    full = ae.decode(z, num_frames=11)
    # equal up to float rounding: oneDNN picks convolution kernels by batch size, so a 4-frame and an 11-frame
    # batch may round differently (measured up to 6.7e-6 with one thread)
    for chunk in (4, 5, 8):
        torch.testing.assert_close(ae.decode(z, num_frames=chunk), full, atol=2e-5, rtol=1e-5)
    video = VideoAutoencoder.from_image(ae)
    _randomize_temporal(video)
    with force_alpha_one(video):
        torch.testing.assert_close(video.decode(z, num_frames=4), full, atol=2e-5, rtol=1e-5)
    # with temporal layers active, chunks see other neighbours than a one-shot decode, so they differ; the
    # cross-fade keeps the chunked video close to the one-shot one, closer than a hard cut between the same chunks
    # (windows (0, 8) and (3, 11); the cut takes each frame from the last chunk covering it). Measured on this
    # fixture: mean |diff| 0.0047 blended vs 0.0092 cut, against mean |frame| 0.33
    with torch.no_grad():
        chunked, oneshot = video.decode(z, num_frames=8), video.decode(z, num_frames=11)
        first, second = video._decode_frames(z[:, 0:8]), video._decode_frames(z[:, 3:11])
    cut = torch.cat([first, second[:, 5:]], dim=1)
    blended_err = (chunked - oneshot).abs().mean()
    assert blended_err < 0.75 * (cut - oneshot).abs().mean()
    assert blended_err < 0.03 * oneshot.abs().mean()


def test_long_video_decodes_with_bounded_memory(ae):
    """Memory bound by construction: no decoder call sees more than b * chunk frames, whatever t is."""
    seen: list[int] = []
    handle = ae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        z = torch.randn(1, 40, 4, H // 8, W // 8)
        with torch.no_grad():
            out = ae.decode(z)  # default chunk = config.decode_chunk_frames
    finally:
        handle.remove()
    assert out.shape == (1, 40, 3, H, W)
    assert max(seen) == ae.config.decode_chunk_frames and len(seen) == len(chunk_windows(40, 8, 2))


def test_global_step_counts_training_calls_only():
    model = AutoencoderKL(_cfg(disc_start=2))
    x = _frames(b=1, t=2)
    model.eval()
    model.loss({"frames": x})
    assert int(model.global_step) == 0
    model.train()
    _, logs0 = model.loss({"frames": x})
    _, logs1 = model.loss({"frames": x})
    _, logs2 = model.loss({"frames": x})
    assert int(model.global_step) == 3
    assert "d_loss" not in logs0 and "d_loss" not in logs1 and "d_loss" in logs2
    assert "global_step" in model.state_dict()


def _manual_two_player_grads(model: AutoencoderKL, x: torch.Tensor, seed: int):
    """LDM two-optimizer recipe, computed independently: generator loss through the ORDINARY discriminator with
    gradients taken w.r.t. generator params only; discriminator hinge loss w.r.t. discriminator params only."""
    cfg = model.config
    disc = list(model.discriminator.parameters())
    disc_ids = {id(p) for p in disc}
    gen = [p for p in model.parameters() if p.requires_grad and id(p) not in disc_ids]
    torch.manual_seed(seed)
    enc = model.encoder(x.flatten(0, 1))
    mean, logvar = enc.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    rec = model.decoder(z).unflatten(0, x.shape[:2])
    nll = (x - rec).abs().mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean() / (3 * H * W)
    g_loss = -model.discriminator(rec.flatten(0, 1)).mean()
    last = model.decoder.conv_out.weight
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm()
    d_weight = (gn / (gg + 1e-4)).clamp(0, 1e4).detach() * cfg.disc_weight
    gen_loss = nll + cfg.kl_weight * kl + d_weight * g_loss
    gen_grads = torch.autograd.grad(gen_loss, gen)
    d_loss = hinge_d_loss(model.discriminator(x.flatten(0, 1)), model.discriminator(rec.detach().flatten(0, 1)))
    disc_grads = torch.autograd.grad(d_loss, disc)
    return gen, gen_grads, disc, disc_grads


def test_one_backward_pass_equals_two_player_gan_gradients():
    torch.manual_seed(0)
    model = AutoencoderKL(_cfg(disc_start=0)).train()
    x = _frames(b=2, t=1)
    reference = copy.deepcopy(model)
    torch.manual_seed(7)
    loss, logs = model.loss({"frames": x})
    loss.backward()
    assert logs["d_weight"] > 0
    gen, gen_grads, disc, disc_grads = _manual_two_player_grads(reference, x, seed=7)
    names = {id(p): n for n, p in reference.named_parameters()}
    live = dict(model.named_parameters())
    for p, g in zip(gen, gen_grads, strict=True):
        torch.testing.assert_close(live[names[id(p)]].grad, g, atol=1e-6, rtol=1e-4, msg=names[id(p)])
    for p, g in zip(disc, disc_grads, strict=True):
        torch.testing.assert_close(live[names[id(p)]].grad, g, atol=1e-6, rtol=1e-4, msg=names[id(p)])
    # the discriminator's gradient is the hinge loss's alone: it would differ with the generator term leaking in
    leak = torch.autograd.grad(-reference.discriminator(x.flatten(0, 1)).mean(), disc[-1])[0]
    assert leak.abs().sum() > 0


def test_param_groups_split_discriminator(ae):
    groups = ae.param_groups(TrainConfig(lr=3e-4))
    assert [g["name"] for g in groups] == ["autoencoder", "discriminator"]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in ae.discriminator.parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(ae.parameters()))
    torch.optim.Adam(groups)  # the groups are valid optimizer input


def test_discriminator_shapes():
    assert NLayerDiscriminator(3, 8, 2)(torch.zeros(2, 3, 32, 64)).shape[:2] == (2, 1)
    out = VideoDiscriminator3D(3, 8, 2)(torch.zeros(2, 3, 4, 32, 64))
    assert out.shape[:3] == (2, 1, 4)


def test_checkpoint_round_trip_through_registry(ae, tmp_path):
    from drivesim.training.checkpoint import save_model

    ae.set_scale_factor(0.5)
    try:
        save_model(ae, tmp_path / "ae")
        loaded = drivesim.load(tmp_path / "ae")
        assert type(loaded) is AutoencoderKL and loaded.config == ae.config
        x = _frames(b=1, t=2)
        assert torch.equal(loaded(x), ae(x))
        video = VideoAutoencoder.from_image(ae)
        _randomize_temporal(video)
        save_model(video, tmp_path / "video")
        v2 = drivesim.load(tmp_path / "video")
        assert type(v2) is VideoAutoencoder
        assert not any(p.requires_grad for p in v2.encoder.parameters())
        z = torch.randn(1, 3, 4, H // 8, W // 8)
        assert torch.equal(v2.decode(z), video.decode(z))
        assert v2.attach_to(loaded) is v2
        again = VideoAutoencoder.from_image(drivesim.load(tmp_path / "ae"))
        assert again.config.scale_factor == 0.5
        with pytest.raises(CheckpointError):
            VideoAutoencoder.from_image(drivesim.load(tmp_path / "video"))
    finally:
        ae.set_scale_factor(1.0)


def test_l2_reconstruction_loss():
    model = AutoencoderKL(_cfg(rec_loss="l2", disc_start=10)).eval()
    x = _frames(b=1, t=2)
    torch.manual_seed(3)
    _, logs = model.loss({"frames": x})
    torch.manual_seed(3)
    rec = model.decoder(model.encode(x).sample().flatten(0, 1)).unflatten(0, (1, 2))
    assert logs["rec"] == pytest.approx(F.mse_loss(rec, x).item(), rel=1e-6)
    assert logs["rec"] != pytest.approx((rec - x).abs().mean().item(), rel=1e-3)


def test_lpips_needs_local_weights_and_is_used_when_given(tmp_path):
    from safetensors.torch import save_file

    from drivesim.autoencoder.lpips import LPIPS
    from drivesim.errors import WeightsError

    with pytest.raises(WeightsError, match="not found"):
        AutoencoderKL(_cfg(lpips_weights=str(tmp_path / "missing.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError):
        LPIPS(tmp_path / "junk.safetensors")
    # random stand-in weights with the documented key names (real ones come from torchvision + the LPIPS repo)
    g = torch.Generator().manual_seed(0)
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    tensors = {}
    for n, idx in enumerate(convs):
        tensors[f"features.{idx}.weight"] = torch.randn(widths[n + 1], widths[n], 3, 3, generator=g) * 0.05
        tensors[f"features.{idx}.bias"] = torch.zeros(widths[n + 1])
    for k, c in enumerate([64, 128, 256, 512, 512]):
        tensors[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g)
    save_file({k: v for k, v in tensors.items() if k != "lin4.model.1.weight"}, str(tmp_path / "part.safetensors"))
    with pytest.raises(WeightsError, match="lin4"):
        LPIPS(tmp_path / "part.safetensors")
    save_file(tensors, str(tmp_path / "lpips.safetensors"))
    lp = LPIPS(tmp_path / "lpips.safetensors")
    x = _frames(b=1, t=2).flatten(0, 1)
    assert torch.allclose(lp(x, x), torch.zeros(2)) and (lp(x, x.flip(-1)) > 0).all()
    model = AutoencoderKL(_cfg(lpips_weights=str(tmp_path / "lpips.safetensors")))
    assert not any("lpips" in k or "features" in k for k in model.state_dict())
    _, logs = model.loss({"frames": _frames(b=1, t=1)})
    assert logs["lpips"] > 0


_PEAK_MEMORY_SCRIPT = """
import torch
from drivesim.autoencoder import AutoencoderKL
from drivesim.configs import get_preset
torch.set_num_threads(1)  # per-thread kernel scratch buffers would add a thread-count-dependent share to both
torch.manual_seed(0)
m = AutoencoderKL(get_preset("tiny").autoencoder).eval()
z = torch.randn(1, 48, 4, 16, 32)
# VmHWM (peak RSS of this process image, KiB); ru_maxrss would carry the forking parent's peak across exec
peak = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = peak()
with torch.no_grad():
    m.decode(z, num_frames=8)  # chunked first: ru_maxrss only grows
    chunked = peak()
    m.decode(z, num_frames=48)
    full = peak()
print(chunked - base, full - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for peak RSS (VmHWM)")
def test_long_video_chunked_decode_peak_memory_is_bounded():
    """Measured: peak RSS growth (fresh process) decoding 48 frames at 128x256 in chunks of 8 vs in one go."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    chunked_kib, full_kib = (int(v) for v in out.stdout.split())
    # one-shot activations scale with 48 frames, chunked with 8 (+ the 19 MiB output): expect ~1/3 or less (at 32
    # frames the ratio measured 0.40-0.52 across runs: too close to the bound to be a stable test)
    assert chunked_kib < 0.5 * full_kib, (chunked_kib, full_kib)


def test_crossfade_weights_are_linear_ramps_summing_to_one():
    from drivesim.autoencoder.networks import crossfade_weights as _crossfade_weights

    for t, chunk, overlap in [(20, 8, 2), (11, 4, 1), (9, 8, 3), (40, 8, 4)]:
        win = chunk_windows(t, chunk, overlap)
        total = torch.zeros(t, dtype=torch.float64)
        for i, (s, e) in enumerate(win):
            w = _crossfade_weights(s, e, i == 0, i == len(win) - 1, win[i - 1][1] if i else s,
                                   win[i + 1][0] if i + 1 < len(win) else e)
            total[s:e] += w
        torch.testing.assert_close(total, torch.ones(t, dtype=torch.float64))
    w = _crossfade_weights(6, 14, False, False, 8, 12)  # (20, 8, 2): middle chunk shares 2 frames each side
    torch.testing.assert_close(w, torch.tensor([1 / 3, 2 / 3, 1, 1, 1, 1, 2 / 3, 1 / 3], dtype=torch.float64))
