"""ClipDataset / FrameDataset over a tiny synthetic clip-format dataset."""

import numpy as np
import pytest
import torch
from drivesim.datasets import torch_data
from drivesim.datasets.clips import load_clip, read_manifest, write_synthetic_dataset
from drivesim.datasets.torch_data import ClipDataset, FrameDataset, enumerate_windows

from drivesim.errors import DataError
from drivesim.types import Conditioning


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    write_synthetic_dataset(root, clips=3, frames=6, size=(32, 64), splits=("train", "train", "val"))
    return root


def test_enumerate_windows_counts_every_start():
    # span (3 - 1) * 2 + 1 = 5: a 6-frame clip has 2 starts, a 4-frame clip none
    assert enumerate_windows([6, 4, 5], num_frames=3, frame_stride=2) == [(0, 0), (0, 1), (2, 0)]
    assert len(enumerate_windows([6], 1, 1)) == 6


def test_clip_dataset_items(dataset):
    ds = ClipDataset(dataset, "train", num_frames=3, frame_stride=2, max_boxes=4)
    assert len(ds) == 2 * 2  # two train clips, 2 windows each
    item = ds[1]
    assert item["clip_id"] == "clip_0000" and item["start"] == 1
    assert item["frames"].shape == (3, 3, 32, 64) and item["frames"].dtype == torch.float32
    assert item["frames"].min() >= -1 and item["frames"].max() <= 1
    assert item["boxes"].shape == (3, 4, 4) and item["classes"].shape == (3, 4)
    assert item["box_mask"].dtype == torch.bool and item["track_ids"].dtype == torch.int64
    assert item["night"].dtype == torch.int64 and item["night"].shape == ()
    frames, ann = load_clip(read_manifest(dataset).clips[0])
    expected = torch.from_numpy(frames[[1, 3, 5]]).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(item["frames"], expected)
    b = ann.frames[3][0]
    torch.testing.assert_close(item["boxes"][1, 0], torch.tensor([b.x1 / 64, b.y1 / 32, b.x2 / 64, b.y2 / 32]))
    assert item["box_mask"][:, 0].all() and not item["box_mask"][:, 1].any()
    # the annotated box covers the bright object in the decoded frame
    x1, y1, x2, y2 = int(b.x1), int(b.y1), int(b.x2), int(b.y2)
    assert item["frames"][1, :, y1 + 1:y2 - 1, x1 + 1:x2 - 1].mean() > item["frames"][1].mean()


def test_clips_decoded_once_and_lru_evicts(dataset, monkeypatch):
    calls = []
    real = torch_data.load_clip
    monkeypatch.setattr(torch_data, "load_clip", lambda e: calls.append(e.clip_id) or real(e))
    ds = ClipDataset(dataset, "train", num_frames=2, frame_stride=1, cache_clips=None)
    for i in range(len(ds)):
        ds[i]
    for i in range(len(ds)):
        ds[i]
    assert calls == ["clip_0000", "clip_0001"]
    calls.clear()
    small = ClipDataset(dataset, "train", num_frames=2, frame_stride=1, cache_clips=1)
    small[0], small[len(small) - 1], small[0]
    assert calls == ["clip_0000", "clip_0001", "clip_0000"]


def test_resize_hflip_and_collate_to_conditioning(dataset):
    ds = ClipDataset(dataset, "val", num_frames=2, frame_stride=1, size=(16, 32), hflip_p=1.0, max_boxes=3)
    plain = ClipDataset(dataset, "val", num_frames=2, frame_stride=1, size=(16, 32), max_boxes=3)
    a, b = ds[0], plain[0]
    assert a["frames"].shape == (2, 3, 16, 32)
    torch.testing.assert_close(a["frames"], b["frames"].flip(-1))
    m = b["box_mask"]
    torch.testing.assert_close(a["boxes"][m][:, [0, 2]], 1 - b["boxes"][m][:, [2, 0]])
    batch = torch.utils.data.default_collate([plain[0], plain[1]])
    cond = Conditioning.from_batch(batch)
    assert cond.boxes.shape == (2, 2, 3, 4) and cond.night.shape == (2,) and cond.batch_size == 2


def test_frame_dataset_is_every_frame(dataset):
    ds = FrameDataset(dataset, "train")
    assert len(ds) == 12
    assert ds[7]["frames"].shape == (1, 3, 32, 64) and ds[7]["start"] == 1


def test_window_longer_than_every_clip_is_an_error(dataset):
    with pytest.raises(DataError, match=r"manifest\.json: clips: .*11 frames"):
        ClipDataset(dataset, "train", num_frames=6, frame_stride=2)
    np.testing.assert_equal(len(ClipDataset(dataset, "train", num_frames=6, frame_stride=1)), 2)
