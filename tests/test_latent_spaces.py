"""benchmarks/latent_spaces.py end to end on tiny-preset random-weight stacks (KL-f8 and 3D latents) and one val
clip of 18 frames (16 measured: the 3D space takes multiples of 4): the report's fields, latent numbers per second
of video (3D = 1/4 of KL-f8 at equal channels and resolution), PSNR against an independent computation, the
checkpoint hashes, and a 16-frame rollout per stack. One 16-frame window per side, so FVD is skipped with a reason:
mechanics only, not quality."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from drivesim.datasets.clips import load_clip, read_manifest, write_synthetic_dataset

import drivesim
from drivesim.rollout import init_checkpoint_dir

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latent_spaces.py"
H, W = 32, 64


@pytest.fixture(scope="module")
def report(load_script, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("latent_spaces")
    write_synthetic_dataset(root / "data", clips=2, frames=18, size=(H, W))  # clip 1 is the one val clip
    init_checkpoint_dir(root / "kl", "tiny", seed=0, upsampler=False)
    init_checkpoint_dir(root / "s3d", "tiny", seed=0, upsampler=False, latent_space="3d")
    out = root / "out"
    load_script(SCRIPT).main(["--data", str(root / "data"), "--kl-ae", str(root / "kl" / "autoencoder"), "--ae3d",
                              str(root / "s3d" / "autoencoder"), "--stack-kl", str(root / "kl"), "--stack-3d",
                              str(root / "s3d"), "--rollout-frames", "16", "--rollout-set", "steps=1", "--threads", "0",
                              "--train-command", "ae3d=drivesim train autoencoder_3d ...", "--out", str(out),
                              "--json", str(root / "result.json")])
    rep = json.loads((out / "report.json").read_text())
    assert json.loads((root / "result.json").read_text()) == rep
    return root, rep


def test_report_fields_and_latent_numbers(report):
    _, rep = report
    assert rep["clips"] == 1 and rep["frames"] == 16 and rep["fps"] == 10.0 and rep["video_seconds"] == 1.6
    assert rep["resolution"] == [H, W] and rep["real_windows"] == 1
    assert "2" in rep["fvd_skipped"]  # one window a side: no Frechet distance, and the report says why
    assert rep["train_commands"] == {"ae3d": "drivesim train autoencoder_3d ..."}
    assert rep["command"].startswith("python benchmarks/latent_spaces.py --data ")
    kl, d3 = rep["rows"]["kl-f8"], rep["rows"]["3d"]
    assert kl["label"] == "KL-f8 + video decoder" and kl["frames_per_latent"] == 1 and d3["frames_per_latent"] == 4
    assert kl["latent_shape_first_clip"] == [16, 4, H // 8, W // 8]
    assert d3["latent_shape_first_clip"] == [4, 4, H // 8, W // 8]
    # 4 channels x 4 x 8 per latent frame; 10 latent frames per second of video on KL-f8, 2.5 on 3D latents
    assert kl["latent_numbers_per_video_s"] == pytest.approx(4 * 4 * 8 * 10)
    assert d3["latent_numbers_per_video_s"] == pytest.approx(4 * 4 * 8 * 2.5)
    assert rep["latent_numbers_ratio_3d_over_kl"] == pytest.approx(0.25)
    for row in (kl, d3):
        assert np.isfinite(row["psnr_db"]) and 0 < row["ssim"] <= 1 and row["flicker"] > 0
        assert row["encode_s_per_video_s"] > 0 and row["decode_s_per_video_s"] > 0 and row["fvd16_recon"] is None
        ro = row["rollout"]
        assert ro["rollouts"] == 1 and ro["frames"] == 16 and ro["windows"] == 1 and ro["fvd16"] is None
        assert ro["frames_per_s"] > 0 and ro["fps"] == 10.0 and ro["config"]["steps"] == 1
    assert kl["rollout"]["frames_per_latent"] == 1 and d3["rollout"]["frames_per_latent"] == 4
    assert set(kl["rollout"]["sha256"]) == {"autoencoder", "image_ldm", "prediction", "interpolation"}
    assert set(d3["rollout"]["sha256"]) == {"autoencoder", "prediction"}
    assert "notes" not in rep  # each stack's autoencoder is the one measured for reconstruction
    assert rep["machine"]["torch_threads"] >= 1


def test_checkpoint_hashes_and_psnr_match_an_independent_computation(report):
    root, rep = report
    for key, folder in (("kl_ae", root / "kl" / "autoencoder"), ("ae3d", root / "s3d" / "autoencoder")):
        assert rep["sha256"][key] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    entry = next(e for e in read_manifest(root / "data").clips if e.split == "val")
    real = load_clip(entry)[0][:16].astype(np.float64)  # (16, h, w, 3) uint8 values
    x = torch.from_numpy(real / 127.5 - 1).float().permute(0, 3, 1, 2)[None]
    for space, folder in (("kl-f8", root / "kl" / "autoencoder"), ("3d", root / "s3d" / "autoencoder")):
        ae = drivesim.load(folder).eval()
        with torch.no_grad():
            rec = ae.decode(ae.encode(x).latents(False))[0].clamp(-1, 1).permute(0, 2, 3, 1).double().numpy()
        mse = (((rec + 1) / 2 - real / 255.0) ** 2).mean(axis=(1, 2, 3))
        assert rep["rows"][space]["psnr_db"] == pytest.approx(float(np.mean(10 * np.log10(1.0 / mse))), abs=1e-3)
