"""Rollout memory and speed: peak RSS and frames/s of `drivesim rollout` for short and long rollouts.

Each length runs in a fresh process (`python -m drivesim.cli.main rollout ...` inside a child that reads its own
VmHWM from /proc/self/status afterwards; ru_maxrss would carry a forking parent's peak). Streaming means the
peak must not grow with the number of frames: target peak_rss(longest) / peak_rss(shortest) <= 1.05.

Checkpoints: `--ckpt-dir D` (D/{autoencoder,image_ldm,prediction,interpolation}), or, without it, RANDOMLY
INITIALISED models of `--preset` written to a temp folder (`drivesim.rollout.init_checkpoint_dir`): the frames are
then meaningless, but time and memory are those of the architecture. The JSON says which was used.

    python benchmarks/rollout_memory.py --preset tiny --frames 100 1000 4000 8000 --steps 1 --threads 1
        # -> benchmarks/results/rollout_memory.json (--json-out elsewhere; ~4 min on one thread)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "rollout_memory.json"

CHILD = r"""
import json, sys, time
from drivesim.cli.main import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print("BENCH " + json.dumps({"rc": rc, "wall_s": wall, "vmhwm_kb": int(status["VmHWM"].split()[0])}))
"""


def make_scenario(path: Path, width: int, height: int) -> None:
    from drivesim.datasets.clips import Box
    from drivesim.datasets.scenario import Scenario, save_scenario

    frames = []
    for k in range(40):  # a car drifting right, a truck ahead; looped by the rollout
        dx = (k % 20) * width / 100
        frames.append([Box("1", "car", 0.08 * width + dx, 0.45 * height, 0.3 * width + dx, 0.8 * height),
                       Box("2", "truck", 0.6 * width, 0.4 * height, 0.9 * width, 0.85 * height)])
    save_scenario(Scenario(fps=10.0, width=width, height=height, night=0, crowdedness=2, frames=frames), path)


def run(ckpt: Path, scenario: Path, frames: int, steps: int, out: Path, threads: int | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", CHILD, "rollout", "--scenario", str(scenario), "--ckpt-dir", str(ckpt),
           "--frames", str(frames), "--out", str(out), "--quiet", "--json", "--set", f"steps={steps}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rollout of {frames} frames failed:\n{proc.stdout}\n{proc.stderr}")
    lines = proc.stdout.splitlines()
    bench = json.loads(next(x for x in lines if x.startswith("BENCH "))[6:])
    summary = json.loads(next(x for x in lines if x.startswith("{")))
    return {"frames": frames, "rollout_s": summary["seconds"], "process_wall_s": wall,
            "frames_per_s": frames / summary["seconds"], "peak_rss_mib": bench["vmhwm_kb"] / 1024,
            "segments": summary["segments"], "units": summary["units"]}


def git_state() -> dict:
    """The commit measured and the code paths that differed from it (uncommitted edits in the working tree)."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "drivesim", "cli", "datasets", "bbox_conditioning").splitlines()
    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted": [line[3:] for line in dirty]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="trained checkpoint dir (default: random init)")
    ap.add_argument("--preset", default="tiny", help="preset of the random-init models (without --ckpt-dir)")
    ap.add_argument("--frames", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--steps", type=int, default=1, help="sampler steps per model call")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the rollout process")
    ap.add_argument("--json-out", type=Path, default=RESULT, help="default benchmarks/results/rollout_memory.json")
    args = ap.parse_args()

    from drivesim.configs import get_preset
    from drivesim.rollout import init_checkpoint_dir

    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        tmp = Path(tmp)
        if args.ckpt_dir is None:
            ckpt, source = init_checkpoint_dir(tmp / "ckpt", args.preset, upsampler=False), "random init"
            h, w = get_preset(args.preset).resolution
        else:
            ckpt, source = args.ckpt_dir, "trained"
            h, w = 128, 256
        scenario = tmp / "scenario.json"
        make_scenario(scenario, w, h)
        rows = [run(ckpt, scenario, n, args.steps, tmp / f"out{n}", args.threads) for n in args.frames]
    base = rows[0]["peak_rss_mib"]
    ratio = rows[-1]["peak_rss_mib"] / base
    # what is held whole (labels, decode windows) grows linearly: least-squares slope of peak RSS over frames
    n = [r["frames"] for r in rows]
    rss = [r["peak_rss_mib"] for r in rows]
    mean_n, mean_rss = sum(n) / len(n), sum(rss) / len(rss)
    var_n = sum((x - mean_n) ** 2 for x in n)
    slope = sum((x - mean_n) * (y - mean_rss) for x, y in zip(n, rss, strict=True)) / var_n if var_n else 0.0
    command = " ".join(["python benchmarks/rollout_memory.py", *sys.argv[1:]])
    record = {"benchmark": "rollout_memory", "command": command, "threads": args.threads,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}",
              "models": source, "preset": args.preset if args.ckpt_dir is None else str(args.ckpt_dir),
              "git": git_state(), "resolution": [h, w], "steps": args.steps, "rows": rows,
              "peak_rss_ratio": ratio, "target_ratio": 1.05, "target_met": ratio <= 1.05,
              "peak_rss_slope_kib_per_frame": slope * 1024}
    print(f"rollout memory ({source}, preset {record['preset']}, {h}x{w}, {args.steps} step(s)/call)")
    print(f"{'frames':>7} {'rollout s':>10} {'frames/s':>9} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['frames']:>7} {r['rollout_s']:>10.1f} {r['frames_per_s']:>9.2f} {r['peak_rss_mib']:>13.1f}")
    print(f"peak RSS ratio {rows[-1]['frames']}/{rows[0]['frames']} frames: {ratio:.3f} (target <= 1.05: "
          f"{'met' if record['target_met'] else 'MISSED'}); slope {slope * 1024:.1f} KiB per frame")
    print(json.dumps(record))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
