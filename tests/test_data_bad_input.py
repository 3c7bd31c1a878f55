"""Bad input: every broken dataset gives a DataError naming the file and the field."""

import json
import math
import shutil

import pytest
from drivesim.datasets.clips import load_clip, read_annotation, read_manifest, write_synthetic_dataset
from drivesim.datasets.torch_data import ClipDataset
from drivesim.datasets.validate import validate_dataset

from drivesim.errors import DataError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base") / "ds"
    write_synthetic_dataset(root, clips=2, frames=4, size=(32, 64))
    return root


@pytest.fixture
def ds(base, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(base, root)
    return root


def _entry(root, i=0):
    return read_manifest(root).clips[i]


def _edit_box(root, **changes):
    path = root / "clip_0000.json"
    data = json.loads(path.read_text())
    data["frames"][1]["boxes"][0].update(changes)
    path.write_text(json.dumps(data))
    return path


def test_missing_video(ds):
    (ds / "clip_0000.mp4").unlink()
    with pytest.raises(DataError, match=r"clip_0000\.mp4: video: file not found"):
        load_clip(_entry(ds))


def test_unreadable_video(ds):
    (ds / "clip_0000.mp4").write_bytes(b"\x00\x01 this is not a video " * 50)
    with pytest.raises(DataError, match=r"clip_0000\.mp4: video: (cannot decode|no video stream|no decodable)"):
        load_clip(_entry(ds))


def test_truncated_video(ds):
    path = ds / "clip_0000.mp4"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"clip_0000\.mp4: (video: (cannot decode|no decodable)|num_frames: )"):
        load_clip(_entry(ds))


def test_frame_count_disagrees(ds):
    path = ds / "clip_0000.json"
    data = json.loads(path.read_text())
    data["frames"].append({"index": 4, "boxes": []})
    data["num_frames"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"clip_0000\.mp4: num_frames: video has 4 frames but clip_0000\.json has 5"):
        load_clip(_entry(ds))


def test_num_frames_field_disagrees_with_frames_list(ds):
    path = ds / "clip_0000.json"
    data = json.loads(path.read_text())
    data["num_frames"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"clip_0000\.json: num_frames: says 7 but frames has 4"):
        read_annotation(path)


def test_frame_size_disagrees(ds):
    path = ds / "clip_0000.json"
    data = json.loads(path.read_text())
    data["width"] = 128
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"clip_0000\.mp4: resolution: video is 64x32 but clip_0000\.json says 128x32"):
        load_clip(_entry(ds))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_box(ds, value):
    path = _edit_box(ds, y2=value)
    with pytest.raises(DataError, match=r"clip_0000\.json: frames\[1\]\.boxes\[0\]\.y2: not finite"):
        read_annotation(path)


def test_negative_area_box(ds):
    path = _edit_box(ds, x1=30.0, x2=20.0)
    with pytest.raises(DataError, match=r"clip_0000\.json: frames\[1\]\.boxes\[0\]: non-positive area"):
        read_annotation(path)


def test_out_of_image_box(ds):
    path = _edit_box(ds, x1=70.0, x2=90.0)
    with pytest.raises(DataError, match=r"clip_0000\.json: frames\[1\]\.boxes\[0\]: box lies outside the 64x32"):
        read_annotation(path)


def test_partially_outside_box_is_clipped_and_noted(ds):
    path = _edit_box(ds, x1=-10.0, y2=40.0)
    ann = read_annotation(path)
    box = ann.frames[1][0]
    assert (box.x1, box.y2) == (0.0, 32.0)
    assert len(ann.notes) == 1 and "clip_0000.json: frames[1].boxes[0]: clipped to the image" in ann.notes[0]
    report = validate_dataset(ds)
    assert report.ok and report.notes == ann.notes  # a note, not a failure


def test_unknown_class(ds):
    path = _edit_box(ds, **{"class": "spaceship"})
    with pytest.raises(DataError, match=r"clip_0000\.json: frames\[1\]\.boxes\[0\]\.class: unknown class 'spaceship'"):
        read_annotation(path)


def test_missing_annotation_field(ds):
    path = ds / "clip_0000.json"
    data = json.loads(path.read_text())
    del data["night"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"clip_0000\.json: night: missing"):
        read_annotation(path)


def test_missing_manifest(ds):
    (ds / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json: manifest: file not found"):
        read_manifest(ds)
    with pytest.raises(DataError, match=r"manifest\.json: manifest: file not found"):
        ClipDataset(ds, "train")


def test_empty_dataset(ds):
    path = ds / "manifest.json"
    data = json.loads(path.read_text())
    data["clips"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"manifest\.json: clips: empty dataset"):
        read_manifest(ds)


def test_empty_split(ds):
    path = ds / "manifest.json"
    data = json.loads(path.read_text())
    data["clips"] = [c for c in data["clips"] if c["split"] == "train"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"manifest\.json: clips: no clips in split 'val'"):
        ClipDataset(ds, "val")


def test_validate_reports_every_problem(ds):
    _edit_box(ds, x1=math.nan)
    path = ds / "clip_0001.json"
    data = json.loads(path.read_text())
    data["frames"][0]["boxes"][0]["class"] = "ufo"
    data["frames"][2]["boxes"][0]["x2"] = -1.0
    path.write_text(json.dumps(data))
    (ds / "clip_0001.mp4").write_bytes(b"garbage")
    report = validate_dataset(ds)
    assert report.clips_checked == 2
    assert len(report.problems) == 4, report.problems
    assert any("clip_0000.json: frames[1].boxes[0].x1: not finite" in p for p in report.problems)
    assert any("clip_0001.json: frames[0].boxes[0].class: unknown class" in p for p in report.problems)
    assert any("clip_0001.json: frames[2].boxes[0]: non-positive area" in p for p in report.problems)
    assert any("clip_0001.mp4: video:" in p for p in report.problems)


def test_type_errors_say_what_is_expected_in_words(tmp_path):
    # "expected (<class 'int'>, <class 'float'>)" was Python talking to a user
    import json

    from drivesim.datasets.clips import read_annotation, write_synthetic_dataset

    from drivesim.errors import DataError

    root = tmp_path / "ds"
    write_synthetic_dataset(root, clips=1, frames=2, size=(32, 64))
    path = root / "clip_0000.json"
    data = json.loads(path.read_text())
    data["fps"] = "ten"
    data["frames"][0]["boxes"][0]["x1"] = "left"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        read_annotation(path)
    assert "expected a number" in str(e.value) and "<class" not in str(e.value)
