"""`Conditioning.from_batch`, the one adapter from a batch (datasets, latent cache, scenarios, boxes.json) to the
models' conditioning: the key names, the dtypes, errors naming the key; folding clips into frames; the null
condition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from drivesim.bbox_conditioning.boxes import pack_boxes

from drivesim.errors import DataError
from drivesim.types import BATCH_KEYS, Conditioning


def _batch(b=2, t=3, n=4):
    g = torch.Generator().manual_seed(0)
    return {"boxes": torch.rand(b, t, n, 4, generator=g).double(), "classes": torch.randint(0, 11, (b, t, n)).int(),
            "box_mask": torch.rand(b, t, n, generator=g) > 0.5, "night": np.array([0, 1][:b]),
            "crowdedness": [3, 5][:b], "latents": torch.zeros(b, t, 4, 2, 2)}


def test_from_batch_casts_and_keeps_values():
    batch = _batch()
    cond = Conditioning.from_batch(batch)
    assert cond.boxes.dtype == torch.float32 and cond.classes.dtype == torch.int64
    assert cond.box_mask.dtype == torch.bool and cond.night.dtype == cond.crowdedness.dtype == torch.int64
    assert torch.equal(cond.boxes, batch["boxes"].float()) and cond.night.tolist() == [0, 1]
    assert cond.crowdedness.tolist() == [3, 5] and cond.interpolation_stage is None and cond.context_latents is None
    staged = Conditioning.from_batch(batch | {"interpolation_stage": torch.tensor([0, 1])})
    assert staged.interpolation_stage.tolist() == [0, 1]


@pytest.mark.parametrize("key", BATCH_KEYS)
def test_from_batch_names_a_missing_key(key):
    batch = {k: v for k, v in _batch().items() if k != key}
    with pytest.raises(DataError, match=rf"^clips\.h5: {key}: missing"):
        Conditioning.from_batch(batch, "clips.h5")


def test_from_batch_names_a_shape_that_disagrees():
    with pytest.raises(DataError, match=r"batch: box_mask: expected shape \(2, 3, 4\)"):
        Conditioning.from_batch(_batch() | {"box_mask": torch.ones(2, 3, 5, dtype=torch.bool)})
    with pytest.raises(DataError, match=r"batch: night: expected shape \(2,\)"):
        Conditioning.from_batch(_batch() | {"night": [0]})
    with pytest.raises(DataError, match=r"batch: boxes: expected \(b, t, n, 4\)"):
        Conditioning.from_batch(_batch() | {"boxes": torch.zeros(2, 3, 4)})


def test_packed_boxes_use_the_batch_key_names():
    packed = pack_boxes([[(7, 1, 0, 0, 8, 8)], []], 16, 16, 2)
    batch = packed.as_batch() | {"night": [1], "crowdedness": [1]}
    cond = Conditioning.from_batch(batch)
    assert cond.boxes.shape == (1, 2, 2, 4) and cond.box_mask.tolist() == [[[True, False], [False, False]]]
    assert batch["track_ids"][0, 0, 0] == 7
    second = Conditioning.from_batch(packed.as_batch(1, 2) | {"night": [1], "crowdedness": [1]})
    assert cond.num_frames == 2 and second.num_frames == 1 and not second.box_mask.any()


def test_frames_as_images_folds_time_into_the_batch():
    cond = Conditioning.from_batch(_batch(b=2, t=3))
    images = cond.frames_as_images()
    assert images.boxes.shape == (6, 1, 4, 4) and images.night.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(images.boxes[4, 0], cond.boxes[1, 1]) and torch.equal(images.box_mask[2, 0], cond.box_mask[0, 2])
    with pytest.raises(ValueError, match="interpolation_stage"):
        cond.replace(interpolation_stage=torch.zeros(2, dtype=torch.int64)).frames_as_images()


def test_null_condition_drops_everything():
    null = Conditioning.null(2, 3, 4)
    assert null.boxes.shape == (2, 3, 4, 4) and not null.box_mask.any()
    assert null.drop_boxes.all() and null.drop_night.all() and null.drop_crowdedness.all()
