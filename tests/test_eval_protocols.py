"""Evaluation protocols (window sampling, degraded copies, result records), the HTML report, and the report in a
headless browser. The protocol tests use small stand-in feature functions, so they run without the evaluator
weights; `test_eval_videos_cli_with_weights` runs the real extractors (marked `weights`)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from drivesim.cli.main import main
from drivesim.datasets.clips import (
    Box,
    ClipAnnotation,
    read_annotation,
    read_manifest,
    read_video,
    write_clip,
    write_manifest,
)
from drivesim.eval import protocols
from drivesim.eval.protocols import Extractors, degrade_dataset, evaluate_videos, fvd_over_time, sample_clips
from drivesim.eval.report import REPORT_SCHEMA, build_report, load_inputs

from drivesim.errors import ConfigError, DataError

H, W = 48, 64


def _frames(t: int, seed: int) -> tuple[np.ndarray, list[list[Box]]]:
    """A textured background brightening with k and a red square moving right, so frames are distinct."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = (40 + 60 * np.sin(xx / (3 + seed % 3)) * np.cos(yy / 5) + rng.integers(0, 30)).clip(0, 255)
    frames, boxes = [], []
    for k in range(t):
        f = np.repeat(base[..., None], 3, axis=2).astype(np.float64) + 4 * k
        x0 = (5 + 3 * k + 7 * seed) % (W - 14)
        f[10:24, x0:x0 + 12] = [250, 40, 40]
        frames.append(f.clip(0, 255).astype(np.uint8))
        boxes.append([Box("1", "car", float(x0), 10.0, float(x0 + 12), 24.0)])
    return np.stack(frames), boxes


def make_dataset(root: Path, lengths=(40, 32, 10, 48), splits=None, seed0: int = 0) -> Path:
    splits = splits or ["val"] * len(lengths)
    ids = []
    for i, t in enumerate(lengths):
        frames, boxes = _frames(t, seed0 + i)
        ann = ClipAnnotation(f"clip_{i:03d}", 10.0, W, H, i % 2, 1, "synthetic test", boxes)
        write_clip(root, frames, ann)
        ids.append((ann.clip_id, splits[i]))
    write_manifest(root, ids, source="synthetic test")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("real") / "ds")


def stand_in_extractors() -> Extractors:
    """Cheap features with the extractors' signatures: per-channel means and stds (frames); per-channel means plus
    the mean absolute temporal difference (videos), so temporal order matters for videos. Few dimensions, so a
    handful of clips gives a full-rank covariance."""

    def video(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.float64)
        motion = np.abs(np.diff(v, axis=1)).mean(axis=(1, 2, 3, 4))[:, None]
        return np.concatenate([v.mean(axis=(1, 2, 3)), motion], axis=1)

    def frame(f: np.ndarray) -> np.ndarray:
        f = f.astype(np.float64)
        return np.concatenate([f.mean(axis=(1, 2)), f.std(axis=(1, 2))], axis=1)

    return Extractors(video, frame, {"video": {"network": "stand-in", "weights_sha256": "none"},
                                     "frame": {"network": "stand-in", "weights_sha256": "none"}})


# ---- sampling ------------------------------------------------------------------------------------------------


def test_windows_are_non_overlapping_16_frame_windows_and_short_clips_are_skipped(dataset):
    refs = protocols.list_videos(dataset)
    windows, short = protocols.list_windows(refs)
    assert short == ["clip_002"]  # 10 frames
    got = [(w.video_id, w.start) for w in windows]
    assert got == [("clip_000", 0), ("clip_000", 16), ("clip_001", 0), ("clip_001", 16),
                   ("clip_003", 0), ("clip_003", 16), ("clip_003", 32)]


def test_sample_clips_is_deterministic_and_returns_the_window_frames(dataset):
    a = sample_clips(dataset, n=4, seed=3)
    b = sample_clips(dataset, n=4, seed=3)
    assert a.windows == b.windows and np.array_equal(a.videos, b.videos)
    assert a.videos.shape == (4, 16, H, W, 3) and a.videos.dtype == np.uint8
    assert a.available == 7 and a.skipped_short == ["clip_002"]
    draws = {tuple(sample_clips(dataset, n=4, seed=s).windows) for s in range(6)}
    assert len(draws) > 1, "different seeds should draw different windows"
    full = read_video(dataset / f"{a.windows[0].video_id}.mp4")
    s = a.windows[0].start
    assert np.array_equal(a.videos[0], full[s:s + 16])
    everything = sample_clips(dataset)
    assert len(everything.windows) == 7
    with pytest.raises(ConfigError, match="only 7 windows"):
        sample_clips(dataset, n=8)


def test_sample_clips_split_and_bare_mp4_folder(tmp_path, dataset):
    ds = make_dataset(tmp_path / "mixed", lengths=(16, 32), splits=["train", "val"])
    assert [w.video_id for w in sample_clips(ds, split="val").windows] == ["clip_001", "clip_001"]
    with pytest.raises(DataError, match="split"):
        sample_clips(ds, split="test")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(dataset / "clip_003.mp4", bare / "rollout.mp4")
    sample = sample_clips(bare)
    assert [w.start for w in sample.windows] == [0, 16, 32]
    with pytest.raises(DataError, match="no manifest.json and no .mp4"):
        sample_clips(tmp_path)


# ---- degraded copies ----------------------------------------------------------------------------------------


def test_degrade_shuffle_permutes_frames_and_their_boxes(tmp_path, dataset):
    out = degrade_dataset(dataset, tmp_path / "shuf", kind="shuffle", seed=1)
    assert read_manifest(out).meta["degraded"]["kind"] == "shuffle"
    src = read_video(dataset / "clip_003.mp4").astype(np.float64)
    got = read_video(out / "clip_003.mp4").astype(np.float64)
    assert got.shape == src.shape
    # every frame differs (brightness and square position move with k): match decoded frames to their source
    order = [int(np.argmin(((src - g) ** 2).mean(axis=(1, 2, 3)))) for g in got]
    assert sorted(order) == list(range(len(src))) and order != list(range(len(src)))
    ann_src, ann_out = read_annotation(dataset / "clip_003.json"), read_annotation(out / "clip_003.json")
    assert [ann_out.frames[k][0].x1 for k in range(len(order))] == [ann_src.frames[j][0].x1 for j in order]
    with pytest.raises(DataError, match="already exists"):
        degrade_dataset(dataset, out, kind="shuffle")


def test_degrade_blur_removes_high_frequencies(tmp_path, dataset):
    import cv2

    out = degrade_dataset(dataset, tmp_path / "blur", kind="blur", sigma=2.0)
    for clip in ("clip_000", "clip_003"):
        src, got = read_video(dataset / f"{clip}.mp4"), read_video(out / f"{clip}.mp4")
        sharp = np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in src])
        soft = np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in got])
        assert soft < 0.3 * sharp
        assert abs(src.mean() - got.mean()) < 3  # blur keeps the brightness
    with pytest.raises(ConfigError, match="kind"):
        degrade_dataset(dataset, tmp_path / "x", kind="noise")
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folders left behind"


# ---- protocols with stand-in features -------------------------------------------------------------------------


def test_evaluate_videos_record_and_identity(tmp_path, dataset):
    ex = stand_in_extractors()
    same = evaluate_videos(dataset, dataset, extractors=ex)
    protocols.validate_result(json.loads(json.dumps(same)))
    # identical feature sets: 0 up to sqrtm round-off (the features' variances are ~1e3 here)
    assert same["metrics"]["fvd"]["mean"] == pytest.approx(0.0, abs=1e-3)
    assert same["metrics"]["fid"]["mean"] == pytest.approx(0.0, abs=1e-3)
    assert same["metrics"]["fvd"]["std"] is None and same["protocol"]["num_runs"] == 1
    p = same["protocol"]
    for key in ("num_frames", "n", "seed", "resize", "extractors", "drivesim_version", "date", "windows",
                "short_clips"):
        assert key in p
    assert p["n"] == 7 and p["num_frames"] == 16 and same["real"]["resolution_hw"] == [H, W]
    assert same["real"]["skipped_short"] == ["clip_002"]

    shuffled = degrade_dataset(dataset, tmp_path / "shuf", kind="shuffle", seed=0)
    worse = evaluate_videos(dataset, shuffled, extractors=ex)
    assert worse["metrics"]["fvd"]["mean"] > 1.0

    sub = evaluate_videos(dataset, dataset, n=4, num_runs=3, seed=5, extractors=ex)
    assert sub["protocol"]["num_runs"] == 3 and len(sub["metrics"]["fvd"]["runs"]) == 3
    assert sub["metrics"]["fvd"]["std"] is not None and len(sub["metrics"]["kvd"]["subset_std"]) == 3
    again = evaluate_videos(dataset, dataset, n=4, num_runs=3, seed=5, extractors=ex)
    assert again["metrics"] == sub["metrics"]


def test_fvd_features_see_exactly_the_sampled_windows(dataset):
    seen = {"video": [], "frame": 0}
    ex = stand_in_extractors()

    def video(v):
        seen["video"].append(v.shape)
        return ex.video(v)

    def frame(f):
        seen["frame"] += f.shape[0]
        return ex.frame(f)

    evaluate_videos(dataset, dataset, n=3, num_runs=2, seed=0, extractors=Extractors(video, frame, ex.info))
    assert all(s[1:] == (16, H, W, 3) for s in seen["video"])  # native resolution, 16 frames
    clips = sum(s[0] for s in seen["video"])
    assert seen["frame"] == 16 * clips and clips <= 2 * 7  # each window extracted once per side


def test_fvd_over_time_decodes_a_long_rollout_once_per_batch(tmp_path, dataset, monkeypatch):
    """A pooled curve over one long rollout must not decode the video again for every window (quadratic)."""
    rollouts = make_dataset(tmp_path / "rollouts", lengths=(160,), seed0=20)  # 10 windows
    decodes = []
    from drivesim.eval import windows

    real_decode = windows._decode  # the windows module decodes every source video
    monkeypatch.setattr(windows, "_decode", lambda ref: decodes.append(ref.video_id) or real_decode(ref))
    rec = fvd_over_time(rollouts, dataset, pool=3, extractors=stand_in_extractors())
    assert len(rec["curve"]) == 10
    rollout_decodes = [v for v in decodes if v == "0:clip_000"]  # rollout ids are numbered by source
    assert len(rollout_decodes) == 1, decodes  # 10 windows fit one decode batch of I3D_BATCH * 8


def test_fvd_over_time_per_window_across_rollouts(tmp_path, dataset):
    rollouts = make_dataset(tmp_path / "rollouts", lengths=(48, 48, 40), seed0=10)
    ex = stand_in_extractors()
    rec = fvd_over_time(rollouts, dataset, extractors=ex)
    protocols.validate_result(json.loads(json.dumps(rec)))
    assert [(c["start_frame"], c["num_videos"]) for c in rec["curve"]] == [(0, 3), (16, 3), (32, 2)]
    assert rec["curve_points"][0][0] == 0 and all(c["fvd"] >= 0 for c in rec["curve"])
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(rollouts / "clip_000.mp4", single / "long.mp4")
    with pytest.raises(DataError, match="pool > 1"):
        fvd_over_time(single, dataset, extractors=ex)
    pooled = fvd_over_time(single, dataset, pool=3, extractors=ex)
    assert [(c["start_frame"], c["num_videos"]) for c in pooled["curve"]] == [(0, 2), (16, 3), (32, 2)]
    assert pooled["protocol"]["pool"] == 3


def test_result_validation_names_the_field():
    with pytest.raises(DataError, match="schema"):
        protocols.validate_result({"schema": "x"})
    with pytest.raises(DataError, match="metrics.fvd.mean"):
        protocols.validate_result({"schema": protocols.RESULT_SCHEMA, "schema_version": 1, "kind": "videos",
                                   "metrics": {"fvd": {}}, "protocol": {}})


# ---- report ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory, dataset) -> list[Path]:
    root = tmp_path_factory.mktemp("results")
    ex = stand_in_extractors()
    blurred = degrade_dataset(dataset, root / "blurred", kind="blur")
    videos = evaluate_videos(dataset, blurred, extractors=ex)
    videos["samples"] = [{"label": "blurred", "dataset": "blurred", "max_clips": 1}]
    protocols.write_result(root / "videos.json", videos)
    rollouts = make_dataset(root / "rollouts", lengths=(48, 48, 48), seed0=20)
    protocols.write_result(root / "fot.json", fvd_over_time(rollouts, dataset, extractors=ex))
    samples = {"schema": "drivesim-report-samples", "schema_version": 1,
               "samples": [{"label": "real", "dataset": str(dataset), "clips": ["clip_003"]}]}
    (root / "samples.json").write_text(json.dumps(samples))
    return [root / "videos.json", root / "fot.json", root / "samples.json"]


def test_report_html_and_json(tmp_path, report_inputs, dataset):
    out = tmp_path / "rep" / "report.html"
    assert main(["report", *map(str, report_inputs), "--out", str(out)]) == 0
    page = out.read_text()
    report = json.loads((out.parent / "report.json").read_text())
    assert report["schema"] == REPORT_SCHEMA and report["schema_version"] == 1
    assert [r["kind"] for r in report["results"]] == ["videos", "fvd_over_time"]
    assert [(s["label"], s["clip_id"]) for s in report["samples"]] == [("blurred", "clip_000"), ("real", "clip_003")]
    assert any("author's claim" in c for c in report["caveats"]) and "author&#x27;s claim" in page
    # self-contained: every src/href is a data URI or an in-page anchor
    refs = re.findall(r"""(?:src|href)=['"]([^'"]*)['"]""", page)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [r[:40] for r in refs]
    assert not re.search(r"https?://", page)
    png = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    mp4s = re.findall(r"data:video/mp4;base64,([A-Za-z0-9+/=]+)", page)
    assert len(mp4s) == 2 and base64.b64decode(mp4s[1]) == (dataset / "clip_003.mp4").read_bytes()
    anns = re.findall(r'<script type="application/json" id="ann-\d+">(.*?)</script>', page)
    assert json.loads(anns[1])["frames"][0]["boxes"][0]["class"] == "car"
    assert "show-boxes" in page and "<canvas" in page
    for sha in {r["protocol"]["extractors"]["video"]["weights_sha256"] for r in report["results"]}:
        assert sha in page


def test_report_inputs_are_validated(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(DataError, match="schema"):
        load_inputs([bad])
    bad.write_text(json.dumps({"schema": "drivesim-report-samples", "samples": [{"dataset": 3}]}))
    with pytest.raises(DataError, match=r"samples\[0\].dataset"):
        load_inputs([bad])
    assert main(["report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r.html")]) == 1
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(DataError, match="no results"):
        build_report([], [], tmp_path / "r.html")


# ---- the report in a browser ------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_PROBE = """<script>
window.addEventListener("load", function () {
  setTimeout(function () {
    const vids = Array.from(document.querySelectorAll("video")).map(function (v) {
      return {readyState: v.readyState, duration: v.duration, width: v.videoWidth, height: v.videoHeight,
              error: v.error ? v.error.code : null};
    });
    const img = document.getElementById("fvd-over-time-plot");
    const canvases = Array.from(document.querySelectorAll(".player canvas")).map(function (c) {
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let painted = 0; for (let i = 3; i < d.length; i += 4) { if (d[i] > 0) painted++; }
      return painted;
    });
    const out = document.createElement("pre");
    out.id = "probe";
    out.textContent = JSON.stringify({videos: vids, canvases: canvases,
      plot: img ? {complete: img.complete, naturalWidth: img.naturalWidth} : null,
      tables: document.querySelectorAll("table.metrics tr").length});
    document.body.appendChild(out);
  }, 2500);
});
</script>"""


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--autoplay-policy=no-user-gesture-required", "--mute-audio", f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package `chromium`)")
def test_report_renders_in_headless_chromium(tmp_path, report_inputs):
    out = tmp_path / "report.html"
    build_report(*load_inputs(report_inputs), out)
    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text().replace("</body>", _PROBE + "</body>"))
    res = _chromium(["--virtual-time-budget=8000", "--dump-dom", probe.as_uri()], tmp_path / "profile")
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"probe did not run; chromium rc={res.returncode} stderr tail: {res.stderr[-2000:]}"
    status = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(status["videos"]) == 2
    for v in status["videos"]:
        assert v["error"] is None and v["readyState"] >= 2, status
        assert v["duration"] > 0 and (v["width"], v["height"]) == (W, H), status
    assert status["plot"]["complete"] and status["plot"]["naturalWidth"] > 100, status
    assert status["tables"] == 2  # header + one result
    assert all(p > 0 for p in status["canvases"]), f"boxes not drawn: {status}"
    shot = tmp_path / "report.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1200,1800", "--virtual-time-budget=5000",
                     out.as_uri()], tmp_path / "profile2")
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", res.stderr[-2000:]


# ---- the real extractors -------------------------------------------------------------------------------------


def _have_weights() -> bool:
    from drivesim.eval.weights import weights_path

    return weights_path("i3d") is not None and weights_path("inception") is not None


@pytest.mark.weights
@pytest.mark.skipif(not _have_weights(), reason="evaluator weights absent: run `drivesim eval weights`")
def test_eval_videos_cli_with_weights(tmp_path, dataset):
    from drivesim.eval.weights import weights_sha256

    blurred = degrade_dataset(dataset, tmp_path / "blurred", kind="blur", sigma=3.0)
    same_json, blur_json = tmp_path / "same.json", tmp_path / "blur.json"
    assert main(["eval", "videos", "--real", str(dataset), "--fake", str(dataset), "--out", str(same_json)]) == 0
    assert main(["eval", "videos", "--real", str(dataset), "--fake", str(blurred), "--out", str(blur_json)]) == 0
    same, blur = json.loads(same_json.read_text()), json.loads(blur_json.read_text())
    assert same["metrics"]["fvd"]["mean"] == pytest.approx(0.0, abs=1e-3)
    assert same["metrics"]["fid"]["mean"] == pytest.approx(0.0, abs=1e-3)
    assert blur["metrics"]["fvd"]["mean"] > 1.0 and blur["metrics"]["fid"]["mean"] > 1.0
    ex = blur["protocol"]["extractors"]
    assert ex["video"]["weights_sha256"] == weights_sha256("i3d")
    assert ex["frame"]["weights_sha256"] == weights_sha256("inception")
