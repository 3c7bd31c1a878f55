"""Perception export: COCO / YOLO round trips back to pixel boxes, pycocotools, images, atomic output."""

import errno
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from drivesim.bbox_conditioning.classes import CLASS_NAMES
from drivesim.cli.main import main
from drivesim.datasets import export as ex
from drivesim.datasets.clips import (
    Box,
    ClipAnnotation,
    read_annotation,
    read_manifest,
    read_video,
    write_clip,
    write_synthetic_dataset,
)

from drivesim.errors import WriteError


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp") / "ds"
    write_synthetic_dataset(root, clips=3, frames=5, size=(32, 64))
    # a clip with fractional coordinates, an empty frame and a box clipped at the border
    frames = np.full((3, 32, 64, 3), 80, np.uint8)
    ann = ClipAnnotation("frac", 10.0, 64, 32, 0, 2, "test", [
        [Box("4", "bus", 1.25, 2.5, 30.75, 20.125), Box("9", "barrier", 40.0, 16.0, 64.0, 32.0)],
        [],
        [Box("4", "bus", 3.5, 2.5, 33.0, 21.0)],
    ])
    write_clip(root, frames, ann)
    data = json.loads((root / "manifest.json").read_text())
    data["clips"].append({"id": "frac", "video": "frac.mp4", "annotation": "frac.json", "split": "val"})
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def _all_boxes(root):
    """{(clip, frame): [(track_id, class, x1, y1, x2, y2)]} from the dataset's annotations."""
    out = {}
    for e in read_manifest(root).clips:
        ann = read_annotation(e.annotation)
        for k, boxes in enumerate(ann.frames):
            out[(e.clip_id, k)] = [(b.track_id, b.cls, b.x1, b.y1, b.x2, b.y2) for b in boxes]
    return out


def test_coco_round_trip_and_pycocotools(ds, tmp_path):
    pytest.importorskip("pycocotools", reason="pycocotools (a nuscenes-devkit dependency) is not installed")
    from pycocotools.coco import COCO

    out = tmp_path / "coco"
    assert main(["export", str(ds), "--format", "coco", "--out", str(out)]) == 0
    truth = _all_boxes(ds)
    back = ex.read_coco_boxes(out / "annotations.json")
    assert set(back) == set(truth)
    for key, boxes in truth.items():
        got = back[key]
        assert [(t, c) for t, c, *_ in got] == [(t, c) for t, c, *_ in boxes]
        if boxes:
            np.testing.assert_allclose([g[2:] for g in got], [b[2:] for b in boxes], atol=1e-9)

    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == len(truth) and len(coco.getCatIds()) == len(CLASS_NAMES)
    assert coco.loadCats(coco.getCatIds(catNms=["pedestrian"]))[0]["id"] == CLASS_NAMES.index("pedestrian") + 1
    img = next(i for i in coco.loadImgs(coco.getImgIds()) if i["clip"] == "frac" and i["frame"] == 0)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
    assert [a["track_id"] for a in anns] == ["4", "9"] and anns[0]["attributes"]["track_id"] == "4"
    assert anns[0]["bbox"] == pytest.approx([1.25, 2.5, 29.5, 17.625])
    assert anns[0]["area"] == pytest.approx(29.5 * 17.625) and anns[0]["iscrowd"] == 0
    assert anns[0]["category_id"] == CLASS_NAMES.index("bus") + 1
    assert img["width"] == 64 and img["height"] == 32 and img["split"] == "val"
    bus = coco.getAnnIds(catIds=[CLASS_NAMES.index("bus") + 1])
    assert len(bus) == 2
    # images are the decoded video frames, losslessly (PNG)
    frames = read_video(ds / "clip_0001.mp4")
    png = cv2.imread(str(out / "images" / "clip_0001_000003.png"))[..., ::-1]
    np.testing.assert_array_equal(png, frames[3])


def test_yolo_round_trip_every_k_and_jpeg(ds, tmp_path):
    out = tmp_path / "yolo"
    assert main(["export", str(ds), "--format", "yolo", "--out", str(out), "--every", "2",
                 "--image-format", "jpg"]) == 0
    assert (out / "classes.txt").read_text().split() == list(CLASS_NAMES)
    # YOLO tools read splits from the layout: data.yaml points at images/train and images/val (it said "images"
    # for both, so validation ran on the training images)
    yaml_text = (out / "data.yaml").read_text()
    assert "nc: 11" in yaml_text and "train: images/train\n" in yaml_text and "val: images/val\n" in yaml_text
    truth = _all_boxes(ds)
    kept = {key for key in truth if key[1] % 2 == 0}
    split_of = {e.clip_id: e.split for e in read_manifest(ds).clips}
    labels = sorted(f"{p.parent.name}/{p.name}" for p in (out / "labels").glob("*/*.txt"))
    assert labels == sorted(f"{split_of[c]}/{c}_{k:06d}.txt" for c, k in kept)
    assert sorted(f"{p.parent.name}/{p.name}" for p in (out / "images").glob("*/*")) == [
        n.replace(".txt", ".jpg") for n in labels]
    for clip, k in kept:
        got = ex.read_yolo_boxes(out / "labels" / split_of[clip] / f"{clip}_{k:06d}.txt", 64, 32)
        want = [(c, *xyxy) for _, c, *xyxy in truth[(clip, k)]]
        assert [g[0] for g in got] == [w[0] for w in want]
        if want:  # 6 decimals of a normalised coordinate: < 1e-6 * 64 px
            np.testing.assert_allclose([g[1:] for g in got], [w[1:] for w in want], atol=1e-4)
    assert cv2.imread(str(out / "images" / "val" / "frac_000002.jpg")).shape == (32, 64, 3)
    summary = json.loads((out / "export.json").read_text())
    assert summary["images"] == len(kept) and summary["format"] == "yolo"


def test_rollout_folder_without_manifest(ds, tmp_path):
    roll = tmp_path / "rollout"
    roll.mkdir()
    for name in ("frac.mp4", "frac.json"):
        shutil.copy(ds / name, roll / name)
    (roll / "scenario.json").write_text("{}")  # no mp4 beside it: not a clip
    out = tmp_path / "out"
    summary = ex.export_dataset(roll, out, "coco")
    assert summary["clips"] == 1 and summary["images"] == 3 and summary["boxes"] == 3


@pytest.mark.parametrize("fmt", ["coco", "yolo"])
def test_failing_write_leaves_no_partial_output(ds, tmp_path, monkeypatch, fmt, capsys):
    calls = {"n": 0}
    real = ex.write_image

    def disk_full_after_three(path, image):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, image)

    monkeypatch.setattr(ex, "write_image", disk_full_after_three)
    out = tmp_path / "out"
    assert main(["export", str(ds), "--format", fmt, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "write: No space left on device" in err and "images/" in err and "nothing was written" in err
    assert calls["n"] == 4
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no OUT, no temp folder


def test_late_failure_in_label_file_also_cleans_up(ds, tmp_path, monkeypatch):
    def fail(path, text):
        if path.name == "annotations.json":
            raise OSError(errno.EIO, "Input/output error")
        path.write_text(text)

    monkeypatch.setattr(ex, "write_text", fail)
    with pytest.raises(WriteError, match=r"annotations\.json: write: Input/output error"):
        ex.export_dataset(ds, tmp_path / "out", "coco")
    assert list(tmp_path.iterdir()) == []


SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


@pytest.mark.skipif(not (SAMPLE / "manifest.json").is_file(), reason="data/sample not rendered/committed yet")
def test_sample_dataset_exports_and_makes_a_ten_minute_scenario(tmp_path):
    from drivesim.datasets.scenario import load_scenario

    out = tmp_path / "yolo"
    assert main(["export", str(SAMPLE), "--format", "yolo", "--out", str(out), "--every", "25"]) == 0
    assert json.loads((out / "export.json").read_text())["images"] > 0
    assert main(["scenario", "from-clip", str(SAMPLE), "--out", str(tmp_path / "s.json"), "--minutes", "10",
                 "--extend", "chain"]) == 0
    s = load_scenario(tmp_path / "s.json")
    assert s.duration_s == pytest.approx(600, abs=1 / s.fps)
