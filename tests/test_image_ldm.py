"""Image LDM: loss on a cache batch, CFG dropout, checkpoint round trip, `sample-image` CLI and train stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from drivesim.bbox_conditioning.boxes import pack_boxes
from drivesim.cli.main import main

from drivesim.configs import get_preset
from drivesim.errors import DataError
from drivesim.models.image_ldm import ImageLDM
from drivesim.pipeline.sample import read_boxes_json
from drivesim.registry import get_model_class
from drivesim.training.checkpoint import load_model, save_model
from drivesim.types import Conditioning

TINY = get_preset("tiny").image_ldm


def _batch(b=2, t=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, t, n, 2, generator=g) * 0.5
    return {
        "latents": torch.randn(b, t, 4, 4, 8, generator=g), "boxes": torch.cat([xy, xy + 0.3], -1),
        "classes": torch.randint(0, 11, (b, t, n), generator=g), "box_mask": torch.rand(b, t, n, generator=g) > 0.3,
        "night": torch.tensor([0, 1]), "crowdedness": torch.tensor([2, 9]),
    }


def test_registered_and_loss_backward():
    assert get_model_class("image_ldm") is ImageLDM
    torch.manual_seed(0)
    model = ImageLDM(TINY).train()
    loss, logs = model.loss(_batch())
    assert loss.ndim == 0 and torch.isfinite(loss) and "boxes_dropped" in logs
    loss.backward()
    # zero-initialised out conv: its gradient is what starts learning
    assert model.unet.out_conv.weight.grad is not None and model.unet.out_conv.weight.grad.abs().sum() > 0


def test_images_from_batch_folds_frames():
    batch = _batch()
    x0, cond = ImageLDM.images_from_batch(batch)
    assert x0.shape == (6, 1, 4, 4, 8)
    assert torch.equal(x0[4, 0], batch["latents"][1, 1])  # (b t) order: b-major
    assert torch.equal(cond.boxes[4, 0], batch["boxes"][1, 1])
    assert cond.night.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="night"):
        ImageLDM.images_from_batch({k: v for k, v in batch.items() if k != "night"})


def test_cfg_dropout_rates_and_independence():
    model = ImageLDM(TINY)
    n = 20000
    cond = Conditioning(boxes=torch.zeros(n, 1, 1, 4), classes=torch.zeros(n, 1, 1, dtype=torch.long),
                        box_mask=torch.ones(n, 1, 1, dtype=torch.bool), night=torch.zeros(n, dtype=torch.long),
                        crowdedness=torch.zeros(n, dtype=torch.long))
    d = model.drop_for_guidance(cond, generator=torch.Generator().manual_seed(0))
    for flags in (d.drop_night, d.drop_crowdedness, d.drop_boxes):
        assert abs(flags.float().mean().item() - 0.1) < 0.01
    both = (d.drop_night & d.drop_boxes).float().mean().item()
    assert abs(both - 0.01) < 0.004  # independent, not one shared coin


def test_checkpoint_round_trip_and_deterministic_sampling(tmp_path):
    torch.manual_seed(0)
    model = ImageLDM(TINY).eval()
    with torch.no_grad():  # open the zero-initialised branches so outputs (and labels) matter
        for name, p in model.unet.named_parameters():
            if name.endswith(("out_conv.weight", "conv2.weight", "proj_out.weight")):
                p.normal_(0, 0.05)
    save_model(model, tmp_path / "ldm")
    loaded = load_model(tmp_path / "ldm", "image_ldm")
    _, cond = ImageLDM.images_from_batch(_batch())
    a = model.sample(cond, (4, 8), steps=3, generator=torch.Generator().manual_seed(5))
    b = loaded.sample(cond, (4, 8), steps=3, generator=torch.Generator().manual_seed(5))
    assert a.shape == (6, 1, 4, 4, 8) and torch.equal(a, b)
    c = loaded.sample(cond, (4, 8), steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(a, c)


def _boxes_json(path, **extra):
    data = {"width": 64, "height": 32, "boxes": [{"class": "car", "x1": 4, "y1": 10, "x2": 30, "y2": 28},
                                                 {"class": "pedestrian", "x1": 40, "y1": 8, "x2": 46, "y2": 24}]}
    data.update(extra)
    path.write_text(json.dumps(data))
    return path


def test_read_boxes_json(tmp_path):
    spec = read_boxes_json(_boxes_json(tmp_path / "b.json"), max_boxes=8)
    assert spec["boxes"].shape == (1, 1, 8, 4) and int(spec["box_mask"].sum()) == 2
    assert spec["crowdedness"] == 1 and spec["night"] is None  # one vehicle-class box
    np.testing.assert_allclose(spec["boxes"][0, 0, 0].numpy(), [4 / 64, 10 / 32, 30 / 64, 28 / 32])
    bad = {"boxes": [{"class": "car", "x1": 4, "y1": 10, "x2": 3, "y2": 28}]}
    with pytest.raises(DataError, match=r"boxes\[0\]"):
        read_boxes_json(_boxes_json(tmp_path / "c.json", **bad), max_boxes=8)
    with pytest.raises(DataError, match=r"boxes\[0\].class"):
        read_boxes_json(_boxes_json(tmp_path / "d.json", boxes=[{"class": "tank", "x1": 0, "y1": 0, "x2": 1,
                                                                  "y2": 1}]), max_boxes=8)
    with pytest.raises(DataError, match="width"):
        read_boxes_json(_boxes_json(tmp_path / "e.json", width=60), max_boxes=8)


def test_sample_image_cli(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(ImageLDM(TINY), tmp_path / "ldm")
    boxes = _boxes_json(tmp_path / "boxes.json")
    out = tmp_path / "png"
    rc = main(["sample-image", "--ckpt", str(tmp_path / "ldm"), "--boxes", str(boxes), "--night", "1",
               "--out", str(out), "-n", "2", "--steps", "2"])
    assert rc == 0
    from PIL import Image

    files = sorted(p.name for p in out.iterdir())
    assert files == ["sample_000.png", "sample_000_boxes.png", "sample_001.png", "sample_001_boxes.png"]
    img = np.asarray(Image.open(out / "sample_000_boxes.png"))
    assert img.shape == (32, 64, 3)
    assert not np.array_equal(img, np.asarray(Image.open(out / "sample_000.png")))  # boxes were drawn
    rc = main(["sample-image", "--ckpt", str(tmp_path / "ldm"), "--boxes", str(tmp_path / "missing.json"),
               "--out", str(out)])
    assert rc == 1 and "missing.json" in capsys.readouterr().err


def test_train_stage_smoke(tmp_path):
    from drivesim.datasets.latent_cache import LatentCacheWriter

    cache = tmp_path / "latents.h5"
    rng = np.random.default_rng(0)
    with LatentCacheWriter(cache, encoder_id="test", scale_factor=0.5, max_boxes=8) as w:
        for i in range(2):
            boxes = [[(0, 0, 4.0, 4.0, 30.0, 20.0)] for _ in range(3)]
            w.add_clip(f"c{i}", rng.standard_normal((3, 4, 4, 8)).astype(np.float32),
                       pack_boxes(boxes, 64, 32, 8), night=i, crowdedness=1, fps=10.0, split="train",
                       width=64, height=32)
    rc = main(["train", "image_ldm", "--preset", "tiny", "--data", str(cache), "--out", str(tmp_path / "run"),
               "--max-steps", "2"])
    assert rc == 0
    model = load_model(tmp_path / "run", "image_ldm")
    assert isinstance(model, ImageLDM)
