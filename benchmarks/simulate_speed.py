"""How fast does MetaDrive render clips here? Time `drivesim data simulate` for a few clips of the sample's settings.

    python benchmarks/simulate_speed.py --clips 4 --workers 1 --out benchmarks/results/simulate_speed.json

Runs the command the committed sample was made with (`data/sample/manifest.json`), fewer clips, into a temporary
folder, and reports wall seconds per clip and per simulator process. The simulator must be installed
(`bash scripts/setup_sim.sh`). The load average at start and end is recorded: rendering runs on the CPU (llvmpipe),
so other jobs on the machine slow it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    from drivesim.eval.results import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    drivesim_cli = shutil.which("drivesim") or str(Path(sys.executable).with_name("drivesim"))
    tmp = Path(tempfile.mkdtemp(prefix="simulate_speed_"))
    cmd = [drivesim_cli, "data", "simulate", "--out", str(tmp / "clips"), "--clips", str(args.clips),
           "--frames", "32", "--size", "128x256", "--seed", "0", "--workers", str(args.workers),
           "--night-fraction", "0.5", "--warmup", "30", "--traffic-density", "0.3", "--map", "4"]
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, check=True)
    finally:
        wall = time.perf_counter() - t0
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "command": " ".join(["drivesim", *cmd[1:]]).replace(str(tmp / "clips"), "TMP"),
        "clips": args.clips, "workers": args.workers, "frames_per_clip": 32, "warmup_steps": 30,
        "wall_s": round(wall, 1), "s_per_clip": round(wall / args.clips, 2),
        "s_per_clip_per_worker": round(wall * args.workers / args.clips, 2),
        "loadavg_1min_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    }
    print(report)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
