"""benchmarks/upsampler_temporal.py end to end on a tiny-preset upsampler and tiny data (one 16-frame val window,
1 sampler step): the report's fields, PSNR of the bicubic row against an independent computation, and that
forcing alpha = 1 changes the output exactly when the temporal layers are not inert."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from drivesim.datasets.clips import write_synthetic_dataset

from drivesim.configs import get_preset
from drivesim.models.upsampler import Upsampler
from drivesim.training.checkpoint import save_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "upsampler_temporal.py"


def _upsampler(path: Path, temporal_active: bool) -> Path:
    """A tiny upsampler whose every weight is random (zero-initialised layers would hide the inputs), except,
    unless `temporal_active`, the temporal layers' zero-initialised output layers: those stay zero, so the
    temporal path adds nothing and alpha = 1 must give the same output."""
    torch.manual_seed(0)
    model = Upsampler(get_preset("tiny").upsampler)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and not p.abs().sum() and (temporal_active or ".temporal." not in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ups_data") / "data"
    write_synthetic_dataset(root, clips=2, frames=16, size=(32, 64))  # clip 1 is the one val clip: 1 window
    return root


def _run(load_script, tmp_path: Path, data: Path, model: Path) -> dict:
    out = tmp_path / "out"
    load_script(SCRIPT).main(["--data", str(data), "--upsampler", str(model), "--out", str(out), "--steps", "1",
                              "--noise-level", "30", "--json", str(tmp_path / "result.json")])
    report = json.loads((out / "report.json").read_text())
    assert json.loads((tmp_path / "result.json").read_text()) == report
    assert (out / "filmstrip.png").stat().st_size > 0
    return report


def test_report_fields_and_bicubic_psnr(load_script, tmp_path, data):
    report = _run(load_script, tmp_path, data, _upsampler(tmp_path / "model", temporal_active=True))
    assert report["windows"] == 1 and report["frames"] == 16 and report["full_val_windows"] == 1
    assert report["resolution"] == [32, 64] and report["lowres"] == [8, 16] and report["scale"] == 4
    assert report["steps"] == 1 and report["noise_level"] == 30 and report["seeds"] == [0]
    # one window: no Frechet distance, and the report says why
    assert "2" in report["fvd_skipped"] and report["summary"]["fvd/video"] is None
    assert report["summary"]["fvd_gain"] is None and report["bicubic"]["fvd"] is None
    for name in ("video", "alpha1"):
        row = report["per_seed"]["0"][name]
        assert set(row) == {"fvd", "psnr", "temporal_error", "diff1", "diff2"}
        assert np.isfinite(row["psnr"]) and row["temporal_error"] > 0 and row["diff1"] > 0 and row["diff2"] > 0
        assert report["summary"][f"psnr/{name}"]["mean"] == row["psnr"]
        assert report["summary"][f"psnr/{name}"]["std"] == 0.0
    assert report["seconds_per_window"]["video"] > 0 and report["estimate_full_val_s"] > 0
    assert report["alphas"]["n"] > 0 and report["machine"]["torch_threads"] >= 1
    assert report["real"]["temporal_error"] == 0.0 and report["real"]["diff1"] > 0
    # the temporal layers are active: forcing alpha = 1 changes the upsampled frames
    assert report["per_seed"]["0"]["video_vs_alpha1"] > 1e-3

    # bicubic PSNR recomputed independently: block means by reshaping, bicubic by torch, PSNR per frame
    from drivesim.datasets.clips import load_clip, read_manifest

    entry = next(e for e in read_manifest(data).clips if e.split == "val")
    real = load_clip(entry)[0][:16].astype(np.float64)  # (16, 32, 64, 3)
    low = (real / 127.5 - 1).reshape(16, 8, 4, 16, 4, 3).mean(axis=(2, 4))
    up = torch.nn.functional.interpolate(torch.from_numpy(low).permute(0, 3, 1, 2), scale_factor=4, mode="bicubic")
    up = ((up.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    expected = np.mean([10 * np.log10(255.0**2 / ((up[k] - real[k]) ** 2).mean()) for k in range(16)])
    assert report["bicubic"]["psnr"] == pytest.approx(expected, abs=1e-3)


def test_inert_temporal_layers_leave_alpha_one_unchanged(load_script, tmp_path, data):
    """Zero-output temporal layers: alpha = 1 must not change a pixel, so the measure above is not noise."""
    report = _run(load_script, tmp_path, data, _upsampler(tmp_path / "model", temporal_active=False))
    assert report["per_seed"]["0"]["video_vs_alpha1"] < 1e-3
    assert report["per_seed"]["0"]["video"]["psnr"] == pytest.approx(report["per_seed"]["0"]["alpha1"]["psnr"],
                                                                       abs=0.05)
