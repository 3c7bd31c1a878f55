"""Property-based tests (hypothesis): box parsing, box packing, scenario validation, resample / extend invariants."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from drivesim.bbox_conditioning.boxes import pack_boxes
from drivesim.bbox_conditioning.classes import CLASS_NAMES
from drivesim.datasets import scenario as sc
from drivesim.datasets.clips import Box, parse_box
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from drivesim.errors import DataError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PATH = Path("scn.json")

sizes = st.tuples(st.integers(1, 2048), st.integers(1, 2048))
finite = st.floats(-1e5, 1e5, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def _raw(x1, y1, x2, y2, cls="car", track_id="1"):
    return {"track_id": track_id, "class": cls, "x1": x1, "y1": y1, "x2": x2, "y2": y2}


# ---- parse_box -------------------------------------------------------------------------------------------------


@st.composite
def overlapping_interval(draw, extent: int):
    """(lo, hi) with lo < hi whose overlap with [0, extent] has positive length; lo/hi may lie outside it."""
    lo = draw(st.floats(-3.0 * extent, float(extent), exclude_max=True, allow_subnormal=False))
    hi = draw(st.floats(max(lo, 0.0), 4.0 * extent, exclude_min=True, allow_subnormal=False))
    return lo, hi


@FAST
@given(size=sizes, data=st.data())
def test_parse_box_overlapping_boxes_clip_inside_the_image(size, data):
    w, h = size
    x1, x2 = data.draw(overlapping_interval(w))
    y1, y2 = data.draw(overlapping_interval(h))
    box, note = parse_box(_raw(x1, y1, x2, y2), w, h, PATH, "frames[0].boxes[0]")
    assert 0 <= box.x1 < box.x2 <= w and 0 <= box.y1 < box.y2 <= h
    inside = x1 >= 0 and y1 >= 0 and x2 <= w and y2 <= h
    assert (note is None) == inside
    if inside:
        assert (box.x1, box.y1, box.x2, box.y2) == (x1, y1, x2, y2)
    else:
        assert "clipped to the image" in note


@FAST
@given(size=sizes, c=st.tuples(finite, finite, finite, finite))
def test_parse_box_boxes_outside_or_without_area_raise_naming_the_box(size, c):
    w, h = size
    x1, y1, x2, y2 = c
    overlaps = max(x1, 0) < min(x2, w) and max(y1, 0) < min(y2, h)
    assume(not (x1 < x2 and y1 < y2 and overlaps))
    with pytest.raises(DataError, match=r"^scn\.json: frames\[2\]\.boxes\[5\]: (non-positive area|box lies outside)"):
        parse_box(_raw(x1, y1, x2, y2), w, h, PATH, "frames[2].boxes[5]")


@FAST
@given(field=st.sampled_from(["x1", "y1", "x2", "y2"]), bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       size=sizes)
def test_parse_box_non_finite_coordinate_names_the_field(field, bad, size):
    raw = _raw(0.0, 0.0, 1.0, 1.0)
    raw[field] = bad
    with pytest.raises(DataError, match=rf"^scn\.json: frames\[0\]\.boxes\[1\]\.{field}: not finite"):
        parse_box(raw, *size, PATH, "frames[0].boxes[1]")


@FAST
@given(cls=st.text(min_size=0, max_size=12).filter(lambda s: s not in CLASS_NAMES))
def test_parse_box_unknown_class_names_the_field(cls):
    with pytest.raises(DataError, match=r"^scn\.json: b\.class: unknown class"):
        parse_box(_raw(0, 0, 1, 1, cls=cls), 8, 8, PATH, "b")


# ---- pack_boxes ------------------------------------------------------------------------------------------------


@st.composite
def frames_of_boxes(draw, max_frames=6, max_per_frame=7):
    w, h = draw(st.integers(1, 512)), draw(st.integers(1, 512))
    frames = []
    for _ in range(draw(st.integers(1, max_frames))):
        boxes = []
        for i in range(draw(st.integers(0, max_per_frame))):
            x1, x2 = sorted(draw(st.lists(st.floats(0, w), min_size=2, max_size=2, unique=True)))
            y1, y2 = sorted(draw(st.lists(st.floats(0, h), min_size=2, max_size=2, unique=True)))
            boxes.append((i, draw(st.integers(0, len(CLASS_NAMES) - 1)), x1, y1, x2, y2))
        frames.append(boxes)
    return w, h, frames


@FAST
@given(data=frames_of_boxes(), max_boxes=st.integers(1, 8))
def test_pack_boxes_invariants(data, max_boxes):
    w, h, frames = data
    p = pack_boxes(frames, w, h, max_boxes)
    t = len(frames)
    assert p.boxes.shape == (t, max_boxes, 4) and p.boxes.dtype == np.float32
    assert p.classes.shape == p.box_mask.shape == p.track_ids.shape == (t, max_boxes)
    assert ((p.boxes >= 0) & (p.boxes <= 1)).all()
    for k, boxes in enumerate(frames):
        m = min(len(boxes), max_boxes)
        assert p.box_mask[k].tolist() == [True] * m + [False] * (max_boxes - m)  # real boxes first, then padding
        assert (p.boxes[k, m:] == 0).all() and (p.track_ids[k, m:] == -1).all() and (p.classes[k, m:] == 0).all()
        area = {b[0]: (b[4] - b[2]) * (b[5] - b[3]) for b in boxes}
        kept = p.track_ids[k, :m].tolist()
        assert len(set(kept)) == m
        kept_areas = [area[i] for i in kept]
        assert kept_areas == sorted(kept_areas, reverse=True)
        if m < len(boxes):  # what was dropped is never larger than what was kept
            assert max(area[i] for i in area if i not in kept) <= min(kept_areas)
        by_id = {b[0]: b for b in boxes}
        for slot, i in enumerate(kept):
            assert p.classes[k, slot] == by_id[i][1]
            px = p.boxes[k, slot].astype(np.float64) * [w, h, w, h]
            np.testing.assert_allclose(px, by_id[i][2:], rtol=1e-6, atol=1e-4 * max(w, h))


# ---- scenarios -------------------------------------------------------------------------------------------------


@st.composite
def scenarios(draw, max_frames=12, max_tracks=5):
    w, h = draw(st.integers(8, 400)), draw(st.integers(8, 400))
    n = draw(st.integers(1, max_frames))
    frames = [[] for _ in range(n)]
    for tid in range(draw(st.integers(0, max_tracks))):
        start = draw(st.integers(0, n - 1))
        stop = draw(st.integers(start + 1, n))
        cls = draw(st.sampled_from(CLASS_NAMES))
        for k in range(start, stop):
            x1 = draw(st.floats(0, w - 1))
            y1 = draw(st.floats(0, h - 1))
            x2 = draw(st.floats(x1 + 0.5, w))
            y2 = draw(st.floats(y1 + 0.5, h))
            frames[k].append(Box(str(tid), cls, x1, y1, x2, y2))
    fps = draw(st.sampled_from([2.0, 7.5, 10.0, 12.5, 30.0]))
    return sc.Scenario(fps, w, h, draw(st.integers(0, 1)), draw(st.integers(0, 30)), frames, "hypothesis")


def _check_frames(s: sc.Scenario):
    for boxes in s.frames:
        ids = [b.track_id for b in boxes]
        assert len(ids) == len(set(ids)), "track ids unique per frame"
        for b in boxes:
            assert 0 <= b.x1 < b.x2 <= s.width and 0 <= b.y1 < b.y2 <= s.height, "boxes inside the image"


@FAST
@given(s=scenarios())
def test_scenario_json_round_trip(s):
    back = sc.scenario_from_json(json.loads(json.dumps(s.to_json())), PATH)
    assert back.frames == s.frames and (back.fps, back.width, back.height, back.night, back.crowdedness) == (
        s.fps, s.width, s.height, s.night, s.crowdedness)
    assert back.notes == []


@FAST
@given(s=scenarios(), data=st.data())
def test_scenario_with_a_frame_missing_is_rejected(s, data):
    assume(s.num_frames >= 2)
    raw = s.to_json()
    k = data.draw(st.integers(0, s.num_frames - 1))
    del raw["frames"][k]
    keep_count = data.draw(st.booleans())
    if not keep_count:
        del raw["num_frames"]
    if keep_count:
        match = r"^scn\.json: num_frames: says"
    elif k == s.num_frames - 1:  # the last frame dropped without num_frames is indistinguishable: still valid
        sc.scenario_from_json(raw, PATH)
        return
    else:
        match = rf"^scn\.json: frames\[{k}\]\.index: expected {k}, got {k + 1}"
    with pytest.raises(DataError, match=match):
        sc.scenario_from_json(raw, PATH)


@FAST
@given(s=scenarios(), data=st.data())
def test_scenario_bad_field_is_named(s, data):
    raw = s.to_json()
    field, bad = data.draw(st.sampled_from([
        ("fps", 0), ("fps", -5.0), ("fps", "ten"), ("width", 0), ("height", -1), ("width", 1.5), ("night", 2),
        ("crowdedness", -1), ("format", "drivesim-clips"), ("format_version", 99), ("frames", []),
        ("frames", {}),
    ]))
    raw[field] = bad
    with pytest.raises(DataError, match=rf"^scn\.json: {field}: "):
        sc.scenario_from_json(raw, PATH)


@FAST
@given(s=scenarios(), fps=st.sampled_from([1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 30.0]),
       method=st.sampled_from(sc.RESAMPLE_METHODS))
def test_resample_invariants(s, fps, method):
    r = sc.resample(s, fps, method)
    assert r.num_frames == max(1, math.floor(s.num_frames * fps / s.fps + 0.5)) and r.fps == fps
    _check_frames(r)
    for j, boxes in enumerate(r.frames):
        pos = min(j * s.fps / fps, s.num_frames - 1)
        nearest = min(math.floor(pos + 0.5), s.num_frames - 1)
        src = {b.track_id: b for b in s.frames[nearest]}
        assert [b.track_id for b in boxes] == list(src)  # tracks (and order) of the nearest source frame
        assert all(b.cls == src[b.track_id].cls for b in boxes)
    if fps == s.fps:
        assert r.frames == s.frames


@FAST
@given(s=scenarios(max_frames=6), n=st.integers(1, 40))
def test_extend_loop_invariants(s, n):
    e = sc.extend(s, n, "loop")
    assert e.num_frames == n
    _check_frames(e)
    seen_in_segment: dict[str, int] = {}
    for k, boxes in enumerate(e.frames):
        src = s.frames[k % s.num_frames]
        assert [(b.cls, b.x1, b.y1, b.x2, b.y2) for b in boxes] == [(b.cls, b.x1, b.y1, b.x2, b.y2) for b in src]
        for b in boxes:  # an id never spans two loops
            assert seen_in_segment.setdefault(b.track_id, k // s.num_frames) == k // s.num_frames


@FAST
@given(parts=st.lists(scenarios(max_frames=5), min_size=1, max_size=3), n=st.integers(1, 30))
def test_extend_chain_invariants(parts, n):
    first = parts[0]
    parts = [sc.Scenario(first.fps, first.width, first.height, first.night, p.crowdedness,
                         [[b for b in f if b.x2 <= first.width and b.y2 <= first.height] for f in p.frames])
             for p in parts]
    e = sc.extend(parts, n, "chain")
    assert e.num_frames == n and e.crowdedness == max(p.crowdedness for p in parts)
    _check_frames(e)
    starts, k, seg = [], 0, 0
    while k < n:
        starts.append(k)
        k += parts[seg % len(parts)].num_frames
        seg += 1
    segment_of = [sum(s <= k for s in starts) - 1 for k in range(n)]
    owner: dict[str, int] = {}
    for k, boxes in enumerate(e.frames):
        for b in boxes:
            assert owner.setdefault(b.track_id, segment_of[k]) == segment_of[k]
