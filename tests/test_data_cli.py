"""`drivesim data info` / `validate` through the CLI entry point."""

import json
import shutil
from pathlib import Path

import pytest
from drivesim.cli.main import main
from drivesim.datasets.clips import write_synthetic_dataset

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "ds"
    write_synthetic_dataset(root, clips=3, frames=4, size=(32, 64))
    return root


def test_info_table_and_json(ds, capsys):
    assert main(["data", "info", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "clips" in out and "night clips" in out and "pedestrian" in out
    assert main(["data", "info", str(ds), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["all"]["clips"] == 3 and summary["all"]["frames"] == 12
    assert summary["splits"]["train"]["clips"] == 2 and summary["splits"]["val"]["night"] == 1
    assert summary["all"]["resolutions"] == ["64x32"] and summary["all"]["fps"] == [10.0]
    assert summary["all"]["boxes_per_frame_max"] == 2
    assert summary["all"]["classes"]["car"] == 4


def test_validate_ok_and_failing(ds, tmp_path, capsys):
    assert main(["data", "validate", str(ds)]) == 0
    assert "3 clip(s) checked, ok" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(ds, bad)
    (bad / "clip_0002.mp4").unlink()
    ann = json.loads((bad / "clip_0000.json").read_text())
    ann["frames"][0]["boxes"][0]["class"] = "ufo"
    ann["frames"][1]["boxes"][0]["x1"] = -5.0  # clipped: a note, not a failure
    (bad / "clip_0000.json").write_text(json.dumps(ann))
    assert main(["data", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2
    assert any("clip_0002.mp4: video: file not found" in line for line in fails)
    assert any("clip_0000.json: frames[0].boxes[0].class: unknown class" in line for line in fails)
    assert "clip_0000.json: 1 box(es) clipped" in out


def test_missing_dataset_is_one_error_line(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "nope: dataset: folder not found" in err and "Traceback" not in err


@pytest.mark.skipif(not (SAMPLE / "manifest.json").is_file(), reason="data/sample not rendered/committed yet")
def test_info_and_validate_on_committed_sample(capsys):
    assert main(["data", "info", str(SAMPLE), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["clips"] >= 48 and summary["splits"]["val"]["clips"] >= 16
    assert summary["all"]["night"] > 0 and summary["all"]["day"] > 0
    assert main(["data", "validate", str(SAMPLE)]) == 0


def test_filmstrip_rows_at_times(tmp_path, capsys):
    """One row per --at time (a time past the end gives the last full row); a negative time is one error line."""
    import cv2

    root = tmp_path / "ds"
    write_synthetic_dataset(root, clips=1, frames=12, size=(32, 64))
    out = tmp_path / "strip.png"
    assert main(["data", "filmstrip", str(root), "--at", "0", "--at", "0.4", "--at", "99", "--frames", "3",
                 "--step", "2", "--scale", "1", "--out", str(out)]) == 0
    img = cv2.imread(str(out))
    assert img.shape == (3 * 32 + 2 * 2, 3 * 64 + 2 * 2, 3)
    assert main(["data", "filmstrip", str(root), "--at", "-1", "--out", str(tmp_path / "x.png")]) == 1
    assert "--at" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
