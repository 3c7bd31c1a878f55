"""Render a clip-format dataset with MetaDrive (`drivesim data simulate`).

The simulator runs in its own virtual environment (`scripts/setup_sim.sh`, default `.venv-sim`, or
`$DRIVESIM_SIM_PYTHON` pointing at its python): this module starts `datasets/metadrive_gen.py` there as worker
subprocesses, each rendering a share of the clips into a staging folder (raw frames + box JSON), then writes the
clips, validated, in the drivesim clip format. The dataset appears under `out` only when every clip is written
(staging in a temp folder next to it, then a rename), so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from drivesim.datasets.clips import annotation_from_json, write_clip, write_manifest

from drivesim.errors import DataError

GENERATOR = Path(__file__).with_name("metadrive_gen.py")
# Absurd requests are refused before a simulator starts: the clip plan is a list in memory, and a worker holds all
# frames of its clip in memory before saving them (and the writer loads them again).
MAX_CLIPS = 100_000  # each clip is a simulator run of seconds to minutes: days of rendering
MAX_CLIP_BYTES = 2 << 30  # frames x height x width x 3 of one clip


def find_sim_python() -> Path:
    """The simulator venv's python: `$DRIVESIM_SIM_PYTHON`, else `$DRIVESIM_SIM_VENV/bin/python`, else `.venv-sim`.

    Raises:
        DataError: no simulator environment (the message says how to create it).
    """
    explicit = os.environ.get("DRIVESIM_SIM_PYTHON")
    candidates = [Path(explicit)] if explicit else []
    venv = os.environ.get("DRIVESIM_SIM_VENV")
    if venv:
        candidates.append(Path(venv) / "bin" / "python")
    candidates += [Path.cwd() / ".venv-sim" / "bin" / "python",
                   Path(__file__).resolve().parents[1] / ".venv-sim" / "bin" / "python"]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"{candidates[0]}: simulator: MetaDrive environment not found (run scripts/setup_sim.sh or "
                    "set DRIVESIM_SIM_PYTHON)")


def plan_clips(clips: int, seed: int, night_fraction: float, val_fraction: float) -> list[dict]:
    """Assign each clip an id, a map seed, day/night and a split, balanced so both splits are half night.

    Returns:
        list of {"id", "seed", "night", "split"}; deterministic for the arguments.
    """
    if clips < 1:
        raise DataError(f"--clips: must be >= 1, got {clips}")
    num_val = int(round(clips * val_fraction))
    jobs = []
    for split, count, offset in (("train", clips - num_val, 0), ("val", num_val, clips - num_val)):
        for k in range(count):
            i = offset + k
            # Bresenham spread: floor((k+1) f) - floor(k f) is 1 for round(count * f) evenly spaced k
            night = int(math.floor((k + 1) * night_fraction) - math.floor(k * night_fraction))
            jobs.append({"id": f"clip_{i:04d}", "seed": seed * 10_000 + i, "night": night, "split": split})
    return jobs


def simulate(
    out_dir: str | Path,
    clips: int,
    frames: int,
    size: tuple[int, int] = (128, 256),
    seed: int = 0,
    workers: int = 2,
    night_fraction: float = 0.5,
    val_fraction: float = 0.25,
    warmup: int = 30,
    traffic_density: float = 0.3,
    map_blocks: str = "4",
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Render `clips` clips of `frames` frames at `size` = (height, width) into a new clip-format dataset.

    Args:
        out_dir: the dataset folder to create (must not exist).
        seed: base seed; clip i renders on MetaDrive map seed `seed * 10000 + i` (the map and its traffic).
        workers: simulator processes (each renders on one core with one llvmpipe thread).
        night_fraction / val_fraction: share of night clips (in each split) and of val clips.
        warmup: simulator steps (0.1 s) before recording, so the ego car is moving.
        traffic_density: MetaDrive's traffic density (vehicles per 10 m of lane, roughly).
        map_blocks: MetaDrive map: a number of random road blocks, or a block string such as "SCrRX".
        command: the command line recorded in the manifest (default: this process's argv).
        progress: called about once a second with a status line.

    Returns:
        the dataset folder. Its manifest records command, seed and every generation setting; each clip's
        `source` names the simulator version and the map seed actually used.

    Raises:
        DataError: `out_dir` exists, bad sizes (or more than MAX_CLIPS clips, more than MAX_CLIP_BYTES of frames
            per clip), the simulator environment is missing, or a worker failed (the tail of its log). Nothing is
            left at `out_dir` on failure.
    """
    out = Path(out_dir)
    if out.exists():
        raise DataError(f"{out}: --out: already exists")
    height, width = size
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise DataError(f"--size: {height}x{width} must be positive multiples of 8")
    if frames < 1:
        raise DataError(f"--frames: must be >= 1, got {frames}")
    if clips > MAX_CLIPS:
        raise DataError(f"--clips: {clips} exceeds the limit of {MAX_CLIPS}")
    if height * width * 3 > MAX_CLIP_BYTES:
        raise DataError(f"--size: {height}x{width} exceeds the limit of {MAX_CLIP_BYTES >> 30} GiB of frames per "
                        "clip with one frame")
    if frames * height * width * 3 > MAX_CLIP_BYTES:
        limit = MAX_CLIP_BYTES // (height * width * 3)
        raise DataError(f"--frames: {frames} exceeds the limit of {limit} at {height}x{width} (a worker holds one "
                        f"clip's frames in memory, {MAX_CLIP_BYTES >> 30} GiB at most)")
    if warmup < 0:
        raise DataError(f"--warmup: must be >= 0, got {warmup}")
    if workers < 1:
        raise DataError(f"--workers: must be >= 1, got {workers}")
    sim_python = find_sim_python()
    jobs = plan_clips(clips, seed, night_fraction, val_fraction)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    procs: list[tuple[subprocess.Popen, object]] = []
    try:
        raw = staging / "raw"
        data = staging / "dataset"
        raw.mkdir()
        # interleave so each worker gets the same mix of day and night clips
        shares = [jobs[w::workers] for w in range(min(workers, len(jobs)))]
        env = dict(os.environ, LP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for w, share in enumerate(shares):
            args = [str(sim_python), str(GENERATOR), "--out", str(raw), "--frames", str(frames), "--width",
                    str(width), "--height", str(height), "--warmup", str(warmup), "--traffic-density",
                    str(traffic_density), "--map", str(map_blocks),
                    "--jobs", json.dumps([{k: j[k] for k in ("id", "seed", "night")} for j in share])]
            log = open(staging / f"worker{w}.log", "w")  # noqa: SIM115  (closed in finally)
            procs.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        t0 = time.time()
        while any(p.poll() is None for p, _ in procs):
            failed = [w for w, (p, _) in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                break
            time.sleep(1.0)
            if progress:
                done = len(list(raw.glob("*.raw.json")))
                progress(f"{done}/{len(jobs)} clips rendered ({time.time() - t0:.0f} s)")
        for w, (p, _) in enumerate(procs):
            if p.poll() is None:
                p.terminate()
                p.wait()
            if p.returncode != 0:
                tail = [line for line in (staging / f"worker{w}.log").read_text().strip().splitlines()
                        if line.strip()][-3:]
                raise DataError(f"{sim_python}: simulator worker {w} failed (exit {p.returncode}): "
                                + " | ".join(tail))
        for job in jobs:
            meta_path = raw / f"{job['id']}.raw.json"
            if not meta_path.is_file():
                raise DataError(f"{meta_path}: simulator: clip not written")
            meta = json.loads(meta_path.read_text())
            meta["format_version"] = 1
            meta["num_frames"] = len(meta["frames"])
            annotation = annotation_from_json(meta, meta_path)  # validates every box
            write_clip(data, np.load(raw / f"{job['id']}.npy"), annotation)
        write_manifest(
            data, [(j["id"], j["split"]) for j in jobs],
            source="MetaDrive 0.3.0.1 (datasets/metadrive_gen.py)",
            command=command or " ".join(shlex.quote(a) for a in sys.argv),
            seed=seed, clip_seeds={j["id"]: j["seed"] for j in jobs},
            size=[height, width], frames=frames, fps=10.0, warmup=warmup, traffic_density=traffic_density,
            map=str(map_blocks), night_fraction=night_fraction, val_fraction=val_fraction,
            crowdedness="number of distinct vehicles with a box in at least one frame of the clip",
        )
        os.replace(data, out)
    finally:
        for p, log in procs:
            if p.poll() is None:  # interrupted (Ctrl-C) or failed while others still run
                p.kill()
                p.wait()
            log.close()
        shutil.rmtree(staging, ignore_errors=True)
    return out
