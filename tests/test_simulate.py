"""MetaDrive generator (needs the simulator venv) and the committed sample dataset."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from drivesim.cli.main import main
from drivesim.datasets.clips import load_clip, read_annotation, read_manifest, write_synthetic_dataset
from drivesim.datasets.simulate import find_sim_python, plan_clips

from drivesim.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def _sim_available() -> bool:
    try:
        find_sim_python()
        return True
    except DataError:
        return False


@pytest.mark.sim
@pytest.mark.skipif(not _sim_available(), reason="MetaDrive environment absent (run scripts/setup_sim.sh)")
def test_simulate_renders_a_valid_clip(tmp_path):
    out = tmp_path / "ds"
    rc = main(["data", "simulate", "--out", str(out), "--clips", "1", "--frames", "3", "--size", "64x128",
               "--warmup", "2", "--workers", "1", "--seed", "3"])
    assert rc == 0
    manifest = read_manifest(out)
    assert len(manifest.clips) == 1
    frames, ann = load_clip(manifest.clips[0])
    assert frames.shape == (3, 64, 128, 3)
    assert ann.fps == 10.0 and ann.source.startswith("metadrive-simulator 0.3.0.1")
    assert frames.std() > 5  # a rendered road scene, not a blank buffer
    assert "data simulate" in manifest.meta["command"] and manifest.meta["seed"] == 3
    assert main(["data", "validate", str(out)]) == 0


def test_plan_balances_night_in_both_splits():
    jobs = plan_clips(64, seed=0, night_fraction=0.5, val_fraction=0.25)
    for split, count in (("train", 48), ("val", 16)):
        rows = [j for j in jobs if j["split"] == split]
        assert len(rows) == count and sum(j["night"] for j in rows) == count // 2
    assert len({j["id"] for j in jobs}) == 64
    assert plan_clips(64, 0, 0.5, 0.25) == jobs  # deterministic


def test_simulate_refuses_existing_out_and_missing_sim(tmp_path, monkeypatch):
    from drivesim.datasets.simulate import simulate

    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match="--out: already exists"):
        simulate(tmp_path / "ds", 1, 2)
    monkeypatch.setenv("DRIVESIM_SIM_PYTHON", str(tmp_path / "nope" / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("drivesim.datasets.simulate.Path.is_file", lambda self: False)
    with pytest.raises(DataError, match="setup_sim.sh"):
        simulate(tmp_path / "new", 1, 2)
    assert not (tmp_path / "new").exists()


def test_preview_draws_boxes(tmp_path):
    ds = tmp_path / "ds"
    write_synthetic_dataset(ds)
    out = tmp_path / "p.png"
    assert main(["data", "preview", str(ds), "--out", str(out), "--frame", "0", "--scale", "2"]) == 0
    img = cv2.imread(str(out))
    assert img is not None and img.shape[1] == 2 * read_annotation(read_manifest(ds).clips[0].annotation).width
    assert main(["data", "preview", str(ds), "--out", str(out), "--clip", "nope"]) == 1


@pytest.mark.skipif(not (SAMPLE / "manifest.json").is_file(), reason="data/sample not rendered/committed yet")
def test_committed_sample_matches_the_spec():
    manifest = read_manifest(SAMPLE)
    train, val = manifest.split("train"), manifest.split("val")
    assert len(train) >= 48 and len(val) >= 16
    for clips in (train, val):
        nights = [read_annotation(c.annotation).night for c in clips]
        assert sum(nights) == len(clips) // 2
    ann = read_annotation(train[0].annotation)
    assert (ann.num_frames, ann.height, ann.width, ann.fps) == (32, 128, 256, 10.0)
    size = sum(f.stat().st_size for f in SAMPLE.iterdir())
    assert size < 15 * 2**20
    meta = json.loads((SAMPLE / "manifest.json").read_text())
    assert "drivesim data simulate" in meta["command"] and "seed" in meta
    boxes = [len(b) for c in train[:8] for b in read_annotation(c.annotation).frames]
    assert np.mean(boxes) > 0.5
