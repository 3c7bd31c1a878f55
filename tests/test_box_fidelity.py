"""Box fidelity: layout rasterisation, the COCO AP pipeline against a hand computation, the reference detector
(it learns: beats random boxes after a short run), the shuffled control, the CLI, and the autoencoder's box loss."""

import json

import numpy as np
import pytest
import torch
from drivesim.bbox_conditioning.layout import box_coverage, union_coverage
from drivesim.cli.main import main
from drivesim.eval.box_fidelity import (
    FrameBoxes,
    boxes_of_partners,
    coco_ap,
    load_clip_frames,
    run_detector,
    shuffled_partners,
)
from drivesim.eval.detector import BoxDetector, DetectorConfig, focal_loss, train_detector

from drivesim.configs import AutoencoderConfig, TrainConfig

# ---- layout coverage -------------------------------------------------------------------------------------------


def test_box_coverage_is_the_exact_area_fraction():
    # independent computation: supersample each cell 64x64 and count covered sub-points
    boxes = torch.tensor([[0.13, 0.2, 0.61, 0.77], [0.5, 0.5, 0.52, 0.53], [-0.2, 0.9, 0.3, 1.4]])
    mask = torch.tensor([True, True, True])
    h, w, sub = 4, 8, 64
    cov = box_coverage(boxes, mask, h, w)
    ys = (torch.arange(h * sub) + 0.5) / (h * sub)
    xs = (torch.arange(w * sub) + 0.5) / (w * sub)
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        inside = ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]
        naive = inside.float().reshape(h, sub, w, sub).mean(dim=(1, 3))
        torch.testing.assert_close(cov[k], naive, atol=1.0 / sub + 1e-6, rtol=0)  # supersampling error <= 1/sub
    # total coverage = box area in cells (clipped to the image for the third box)
    assert cov[0].sum().item() == pytest.approx((0.61 - 0.13) * 8 * (0.77 - 0.2) * 4, rel=1e-5)
    assert cov[2].sum().item() == pytest.approx(0.3 * 8 * 0.1 * 4, rel=1e-5)


def test_padding_slots_and_union():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]]])
    cov = box_coverage(boxes, torch.tensor([[True, False]]), 4, 4)
    assert cov[0, 1].abs().sum() == 0  # a padding slot leaves no mark
    u = union_coverage(boxes, torch.tensor([[True, True]]), 4, 4)
    assert u.shape == (1, 4, 4) and u.max() == 1.0 and u[0, 0, 0] == 1.0 and u[0, 3, 3] == 1.0
    assert union_coverage(boxes[:, :0], torch.zeros(1, 0, dtype=torch.bool), 4, 4).abs().sum() == 0


# ---- COCO AP against a hand computation ------------------------------------------------------------------------


def test_coco_ap_matches_hand_computed_three_box_fixture():
    gt = [FrameBoxes(np.array([[10, 10, 30, 30], [50, 10, 80, 40], [10, 50, 40, 90]], float), np.array([0, 0, 0]))]
    # scores 0.9 (hit), 0.85 (miss), 0.8 (hit): precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3; COCO interpolates on
    # 101 recall points: 34 points at 1 (r <= 0.33), 33 at 2/3 (0.34..0.66), 34 at 0 -> AP = 56/101 at every IoU
    det = [FrameBoxes(np.array([[10, 10, 30, 30], [100, 100, 120, 120], [50, 10, 80, 40]], float),
                      np.array([0, 0, 0]), np.array([0.9, 0.85, 0.8]))]
    ap = coco_ap(det, gt)
    for key in ("AP", "AP50", "AP75"):
        assert ap["all"][key] == pytest.approx(56 / 101, abs=1e-9)
    assert ap["all"]["num_gt"] == 3
    # size buckets on sqrt(area): 20 px box -> ge16 and ge12 and 8to16 none
    assert ap["8to16"]["num_gt"] == 0 and ap["8to16"]["AP"] is None
    assert ap["ge16"]["num_gt"] == 3
    # a half-shifted box fails IoU 0.75 but passes 0.5
    shifted = [FrameBoxes(np.array([[15, 10, 35, 30]], float), np.array([0]), np.array([0.9]))]
    one = [FrameBoxes(np.array([[10, 10, 30, 30]], float), np.array([0]))]
    ap = coco_ap(shifted, one)  # IoU = 15*20 / (25*20) = 0.6
    assert ap["all"]["AP50"] == pytest.approx(1.0) and ap["all"]["AP75"] == 0.0
    # the wrong class never matches
    wrong = [FrameBoxes(np.array([[10, 10, 30, 30]], float), np.array([1]), np.array([0.9]))]
    assert coco_ap(wrong, one)["all"]["AP50"] == 0.0
    # no detections at all: 0, not an error
    none = [FrameBoxes(np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0))]
    assert coco_ap(none, one)["all"]["AP"] == 0.0


def test_boxes_that_did_not_condition_the_frame_are_ignore_regions():
    # a generated frame's labels keep the boxes beyond max_boxes marked "conditioned": false; counted as ground
    # truth they made every rollout with crowded frames look worse at following its boxes
    gt = [FrameBoxes(np.array([[10, 10, 30, 30], [50, 10, 80, 40]], float), np.array([0, 0]),
                     ignore=np.array([False, True]))]
    found = [FrameBoxes(np.array([[10, 10, 30, 30]], float), np.array([0]), np.array([0.9]))]
    ap = coco_ap(found, gt)
    assert ap["all"]["AP"] == pytest.approx(1.0) and ap["all"]["num_gt"] == 1  # the ignored box is no miss
    as_object = [FrameBoxes(gt[0].boxes, gt[0].classes)]
    assert coco_ap(found, as_object)["all"]["AP"] == pytest.approx(51 / 101)  # recall 1/2 when it counts
    # a detection on the ignored box is no false positive either (scored above the hit)
    both = [FrameBoxes(np.array([[50, 10, 80, 40], [10, 10, 30, 30]], float), np.array([0, 0]), np.array([0.95, 0.9]))]
    assert coco_ap(both, gt)["all"]["AP"] == pytest.approx(1.0)


def test_shuffled_partners_is_a_derangement():
    for n in (2, 3, 16):
        p = shuffled_partners(n, seed=5)
        assert sorted(p.tolist()) == list(range(n)) and all(p[i] != i for i in range(n))
    with pytest.raises(ValueError):
        shuffled_partners(1, 0)


# ---- the detector ---------------------------------------------------------------------------------------------

TINY = DetectorConfig(resolution=(32, 64), base_channels=8, channel_mult=(1, 2, 2), output_stride=2)


def test_targets_peak_at_centres_and_focal_loss_prefers_them():
    det = BoxDetector(TINY)
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.75], [0.0, 0.0, 0.0, 0.0]]])
    heat, index, log_size, offset, valid = det.targets(boxes, torch.tensor([[1, 0]]), torch.tensor([[True, False]]),
                                                       32, 64)
    assert valid.tolist() == [[True, False]]
    # centre (24, 16) px -> (12, 8) cells at stride 2
    assert heat[0, 1, 8, 12] == 1.0 and heat[0, 1].sum() > 1.0 and heat[0, 0].sum() == 0
    assert index[0, 0] == 8 * 32 + 12
    torch.testing.assert_close(log_size[0, 0], torch.tensor([16.0, 16.0]).log())
    good = torch.where(heat > 0.99, 5.0, -5.0)
    assert focal_loss(good, heat) < focal_loss(-good, heat)


def write_rectangles(root, clips: int, frames: int, seed: int) -> None:
    """Clips of noisy grey frames with 1-3 rectangles whose colour gives the class (red car, blue truck), each
    annotated with exactly its pixels: a task a detector can learn in a minute, unlike a memorised single clip."""
    from drivesim.datasets.clips import Box, ClipAnnotation, write_clip, write_manifest

    rng = np.random.default_rng(seed)
    rows = []
    for c in range(clips):
        video = rng.integers(70, 110, (frames, 32, 64, 3)).astype(np.uint8)
        per_frame = [[] for _ in range(frames)]
        for k in range(frames):
            for o in range(int(rng.integers(1, 4))):
                cls = ("car", "truck")[int(rng.integers(0, 2))]
                w, h = int(rng.integers(5, 16)), int(rng.integers(4, 12))
                x, y = int(rng.integers(0, 64 - w)), int(rng.integers(0, 32 - h))
                video[k, y:y + h, x:x + w] = (220, 40, 40) if cls == "car" else (40, 60, 220)
                per_frame[k].append(Box(f"{c}_{o}", cls, float(x), float(y), float(x + w), float(y + h)))
        ann = ClipAnnotation(f"clip_{c:04d}", 10.0, 64, 32, night=0, crowdedness=3, source="test rectangles",
                             frames=per_frame)
        write_clip(root, video, ann)
        rows.append((ann.clip_id, "val" if c % 4 == 3 else "train"))
    write_manifest(root, rows, source="test rectangles", command="write_rectangles", seed=seed)


@pytest.fixture(scope="module")
def rect_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("det") / "ds"
    write_rectangles(root, clips=24, frames=4, seed=3)
    return root


@pytest.fixture(scope="module")
def trained(rect_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("det_run")
    tc = TrainConfig(max_steps=150, batch_size=8, lr=3e-3, warmup_steps=10, lr_schedule="cosine", ema_decay=0.0,
                     checkpoint_every=1000, log_every=50, tracker=None)
    train_detector(rect_data, out, TINY, tc, progress=False)
    return out


def test_detector_beats_random_boxes(rect_data, trained):
    from drivesim.eval.box_fidelity import load_detector

    det, digest = load_detector(trained)
    assert len(digest) == 64
    data = load_clip_frames(rect_data, "val", (32, 64))
    found = coco_ap(run_detector(det, data.frames), data.boxes)["all"]["AP50"]
    rng = np.random.default_rng(0)
    rand = []
    for _ in data.boxes:
        xy = rng.uniform(0, [48, 24], (20, 2))
        wh = rng.uniform(4, [24, 16], (20, 2))
        rand.append(FrameBoxes(np.concatenate([xy, xy + wh], 1), rng.integers(0, 3, 20), rng.uniform(0, 1, 20)))
    chance = coco_ap(rand, data.boxes)["all"]["AP50"]
    shuffled = coco_ap(run_detector(det, data.frames), boxes_of_partners(data, shuffled_partners(6, 0)))
    print(f"AP50 detector {found:.3f}, random boxes {chance:.3f}, shuffled {shuffled['all']['AP50']:.3f}")
    assert found > 0.5 and found > chance + 0.3, (found, chance)
    assert shuffled["all"]["AP50"] < found - 0.3


def test_eval_boxes_cli_writes_the_record(rect_data, trained, tmp_path, capsys):
    out = tmp_path / "boxes.json"
    assert main(["eval", "boxes", "--detector", str(trained), "--clips", str(rect_data), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "box_fidelity" and record["protocol"]["frames"] == 24
    assert record["protocol"]["ground_truth"] == "the clips' own boxes"
    assert "AP50" in capsys.readouterr().out
    assert main(["eval", "boxes", "--detector", str(trained), "--clips", str(rect_data), "--shuffle", "0",
                 "--json"]) == 0
    shuffled = json.loads(capsys.readouterr().out)
    assert shuffled["ap"]["all"]["AP50"] < record["ap"]["all"]["AP50"]
    # a dataset scored against itself by clip id equals its own boxes
    assert main(["eval", "boxes", "--detector", str(trained), "--clips", str(rect_data), "--against",
                 str(rect_data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ap"] == record["ap"]
    assert main(["eval", "boxes", "--detector", str(tmp_path), "--clips", str(rect_data)]) != 0


# ---- the autoencoder's box-weighted reconstruction loss -------------------------------------------------------


def test_autoencoder_box_loss_is_the_error_inside_boxes():
    from drivesim.autoencoder import AutoencoderKL

    cfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1, box_weight=2.0)
    torch.manual_seed(0)
    ae = AutoencoderKL(cfg).eval()
    x = torch.rand(1, 1, 3, 16, 32) * 2 - 1
    boxes = torch.tensor([[[[0.25, 0.25, 0.5, 0.75]]]])  # pixels x 8..16, y 4..12 exactly
    batch = {"frames": x, "boxes": boxes, "box_mask": torch.tensor([[[True]]])}
    with torch.no_grad():
        torch.manual_seed(1)
        loss, logs = ae.loss(batch)
        torch.manual_seed(1)  # the same posterior draw as inside the loss
        rec, _ = ae._reconstruct_for_loss(x)
    inside = (x - rec).abs()[..., 4:12, 8:16].mean().item()
    assert logs["rec_box"] == pytest.approx(inside, rel=1e-4)
    plain = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1)).eval()
    plain.load_state_dict(ae.state_dict())
    with torch.no_grad():
        _, logs_plain = plain.loss(batch)
    assert "rec_box" not in logs_plain
