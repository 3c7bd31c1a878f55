"""The perception result shown: a terminal table, example pictures per training set, and the report page.

The page (`out/report.html`, self-contained, the style of `drivesim.eval.report`) holds the table of the three
training sets (mean +- std over seeds of AP, AP50, AP75 and AP50 by size), the two comparisons the issue asks
about, one picture per training set, the runs and the protocol. A picture's top row is the first frames the
first seed's run drew from its training set, with their training labels (red); its bottom row is the same real
val frames for every set, with their boxes (red) and that run's detections scoring >= `SHOW_SCORE` (green).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from drivesim.eval.box_fidelity import FrameBoxes, draw_boxes
from drivesim.eval.report import BOX_BUCKETS, fmt, standalone_page

SHOW_SCORE = 0.3  # detections drawn in the pictures (the AP uses all of them)
TRUTH, FOUND = (255, 64, 64), (64, 230, 64)


def training_example(dataset, index: int) -> tuple[np.ndarray, FrameBoxes]:
    """Frame `index` of a `LabelledFrames` or `MixedFrames` as training sees it before the random flip:
    (h, w, 3) uint8 and its training labels in pixels."""
    from drivesim.bbox_conditioning.classes import CLASS_TO_ID

    if hasattr(dataset, "from_synthetic"):  # MixedFrames: the slot's source and item
        source = dataset.synthetic if dataset.from_synthetic[index] else dataset.real
        return training_example(source, int(dataset.item[index]))
    clip, start = dataset.windows[index]
    frame = dataset.clip_frames(clip)[start]
    ann = dataset.annotations[clip]
    sx, sy = frame.shape[1] / ann.width, frame.shape[0] / ann.height
    boxes = ann.frames[start]
    xyxy = np.array([[b.x1 * sx, b.y1 * sy, b.x2 * sx, b.y2 * sy] for b in boxes], np.float64).reshape(-1, 4)
    return frame, FrameBoxes(xyxy, np.array([CLASS_TO_ID[b.cls] for b in boxes], np.int64))


def example_picks(dataset, batch_size: int, seed: int, count: int) -> list[int]:
    """The first `count` indices the run with `seed` drew; for a `MixedFrames`, the first count // 2 synthetic ones
    and the first real ones (so both sources show)."""
    from drivesim.eval.perception import drawn_indices

    steps = max(1, -(-count * 8 // batch_size))  # enough draws to find both sources
    order = [int(i) for i in drawn_indices(len(dataset), batch_size, seed, steps)]
    if not hasattr(dataset, "from_synthetic"):
        return list(dict.fromkeys(order))[:count]
    syn = [i for i in order if dataset.from_synthetic[i]][:count // 2]
    real = [i for i in order if not dataset.from_synthetic[i]][:count - len(syn)]
    return real + syn


def example_strip(train: list[tuple[np.ndarray, FrameBoxes]], val_frames: np.ndarray, val_truth: list[FrameBoxes],
                  detections: list[FrameBoxes]) -> np.ndarray:
    """Top row: training frames with their labels; bottom row: val frames with their boxes and the detections
    scoring >= SHOW_SCORE. (2 h + 8, n (w + 4), 3) uint8 with n = max(row lengths), white padding."""
    h, w = val_frames.shape[1:3]

    def pad(img: np.ndarray) -> np.ndarray:
        if img.shape[:2] != (h, w):
            from drivesim.datasets.transforms import resize_frames

            img = resize_frames(img[None], (h, w))[0]
        return np.pad(img, ((2, 2), (2, 2), (0, 0)), constant_values=255)

    top = [pad(draw_boxes(f, b, TRUTH)) for f, b in train]
    bottom = []
    for frame, truth, det in zip(val_frames, val_truth, detections, strict=True):
        keep = np.asarray(det.scores) >= SHOW_SCORE
        found = FrameBoxes(np.asarray(det.boxes)[keep], np.asarray(det.classes)[keep])
        bottom.append(pad(draw_boxes(draw_boxes(frame, truth, TRUTH), found, FOUND)))
    n = max(len(top), len(bottom))
    blank = np.full((h + 4, w + 4, 3), 255, np.uint8)
    rows = [np.concatenate(r + [blank] * (n - len(r)), axis=1) for r in (top, bottom)]
    return np.concatenate(rows, axis=0)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _cells(ap: dict[str, Any]) -> list[str]:
    """Table cells of one row: AP, AP50, AP75 (all boxes), AP50 by size; mean ± std."""
    out = [fmt(ap["all"][k]["mean"], ap["all"][k]["std"], digits=3) for k in ("AP", "AP50", "AP75")]
    return out + [fmt(ap[b]["AP50"]["mean"], ap[b]["AP50"]["std"], digits=3) for b, _ in BOX_BUCKETS[1:]]


COLUMNS = ["AP", "AP50", "AP75"] + [f"AP50 {html.unescape(label)}" for _, label in BOX_BUCKETS[1:]]


def comparison_lines(record: dict[str, Any]) -> list[str]:
    """The issue's two questions in words (AP50 over all boxes)."""
    c, n = record["comparison"], len(record["protocol"]["seeds"])
    lines = []
    if c["synthetic_over_real_ap50"] is None:
        return ["(a) scores AP50 0 on real val frames: no ratio to report"]
    lines.append(f"(b) synthetic only reaches {100 * c['synthetic_over_real_ap50']:.0f}% of (a)'s AP50 "
                 "(goal: >= 50%)")
    gain = 100 * c["mixed_gain_over_real_ap50"]
    apart = c["mixed_beats_real_outside_std"]
    lines.append(f"(c) real + synthetic: {gain:+.1f}% relative AP50 over (a) at equal steps (goal: >= +5%, outside "
                 "one std); " + ("one seed: no std" if apart is None else
                                 f"mean ± std intervals over {n} seeds {'apart' if apart else 'overlap'}"))
    return lines


def perception_table(record: dict[str, Any]):
    """A rich Table of the three rows (for `drivesim eval perception`)."""
    from rich.table import Table

    p = record["protocol"]
    t = Table(title=f"detector trained {p['steps']} steps x batch {p['batch_size']} per run, scored on "
                    f"{p['real']['val_frames']} real val frames; mean ± std over seeds {p['seeds']}")
    t.add_column("training set")
    t.add_column("frames", justify="right")
    for col in COLUMNS:
        t.add_column(col, justify="right")
    frames = {"real": p["real"]["train_frames"], "synthetic": p["synthetic"]["frames"],
              "mixed": f"p_syn={p['synthetic_fraction']:g}"}
    for name, row in record["rows"].items():
        t.add_row(row["label"], str(frames[name]), *_cells(row["ap"]))
    return t


def perception_section(record: dict[str, Any], pictures: dict[str, bytes]) -> str:
    """The page's body: table, comparisons, pictures, runs and protocol."""
    e = html.escape
    p = record["protocol"]
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    body = "".join(f"<tr><td>{e(row['label'])}</td>" + "".join(f"<td class='num'>{c}</td>" for c in _cells(row['ap']))
                   + "</tr>" for row in record["rows"].values())
    parts = [
        "<section id='perception'><h2>Training a detector on generated data</h2>",
        f"<table class='metrics'><tr><th>trained on</th>{head}</tr>{body}</table>",
        f"<p class='meta'>The reference detector, trained {p['steps']} optimizer steps of {p['batch_size']} frames "
        f"per run (equal steps for every training set), scored with COCO AP (IoU 0.50:0.95), AP50 and AP75 on the "
        f"{p['real']['val_frames']} frames of the real val split; sizes are sqrt(box area) in pixels at "
        f"{p['detector']['resolution'][1]}x{p['detector']['resolution'][0]}. Mean ± std (ddof 1) over seeds "
        f"{e(str(p['seeds']))}. (c) draws a training frame from the synthetic set with probability "
        f"{p['synthetic_fraction']:g}.</p>",
        "<ul>" + "".join(f"<li>{e(line)}</li>" for line in comparison_lines(record)) + "</ul>",
    ]
    for name, png in pictures.items():
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        label = record["rows"][name]["label"]
        parts.append(f"<h3>{e(label)}</h3><img id='examples-{e(name)}' alt='{e(label)}: training frames and val "
                     f"detections' src='{uri}' style='max-width:100%'>")
    parts.append("<p class='meta'>Top rows: the first frames the first seed's run drew from its training set, with "
                 "its training labels (red; for (c), real frames then synthetic ones). Bottom rows: the same real "
                 f"val frames for every set, their boxes (red) and that run's detections scoring >= {SHOW_SCORE} "
                 "(green).</p>")
    run_rows = "".join(
        f"<tr><td>{e(r['set'])}</td><td class='num'>{r['seed']}</td><td class='num'>{r['steps']}</td>"
        f"<td class='num'>{fmt(r['ap']['all']['AP50'], digits=3)}</td>"
        f"<td class='num'>{fmt(r['synthetic_fraction_drawn'], digits=3)}</td>"
        f"<td class='mono'>{e(str(r['detector_sha256'])[:12])}</td><td>{'reused' if r['reused'] else 'trained'}"
        "</td></tr>" for r in record["runs"])
    parts.append("<details><summary>runs</summary><table><tr><th>set</th><th>seed</th><th>optimizer steps</th>"
                 "<th>AP50</th><th>synthetic share drawn</th><th>detector sha256</th><th></th></tr>"
                 f"{run_rows}</table></details>")
    items = "".join(f"<dt>{e(k)}</dt><dd class='mono'>{e(json.dumps(v))}</dd>" for k, v in p.items())
    parts.append(f"<h2>Protocol</h2><p class='mono'>{e(record.get('command') or '')}</p>"
                 f"<dl class='protocol'>{items}</dl></section>")
    return "".join(parts)


def write_report(out: Path, record: dict[str, Any], datasets: dict[str, Any], val, runs: dict[str, Path],
                 device: str = "cpu", count: int = 4) -> Path:
    """Draw the pictures (also saved as `out/examples/<set>.png`) and write `out/report.html`.

    Args:
        datasets: per training set, what its first-seed run trained on (`LabelledFrames` / `MixedFrames`).
        val: the real val split (`drivesim.eval.box_fidelity.ClipFrames`). runs: per set, the first seed's run.
    """
    from drivesim.eval.box_fidelity import load_detector, run_detector

    from drivesim.atomic import write_bytes_atomic

    p = record["protocol"]
    picks = np.linspace(0, len(val.frames) - 1, count).round().astype(int)
    val_frames, val_truth = val.frames[picks], [val.boxes[i] for i in picks]
    pictures = {}
    (out / "examples").mkdir(parents=True, exist_ok=True)
    for name, dataset in datasets.items():
        train = [training_example(dataset, i) for i in example_picks(dataset, p["batch_size"], p["seeds"][0], count)]
        detector, _ = load_detector(runs[name], device)
        png = _png(example_strip(train, val_frames, val_truth, run_detector(detector, val_frames, device=device)))
        write_bytes_atomic(out / "examples" / f"{name}.png", png)
        pictures[name] = png
    page = standalone_page("drivesim: what synthetic data adds to a detector", perception_section(record, pictures))
    write_bytes_atomic(out / "report.html", page.encode("utf-8"))
    return out / "report.html"
