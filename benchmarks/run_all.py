"""Run the performance benchmarks one after the other; each prints its table and writes benchmarks/results/<name>.json.

    python benchmarks/run_all.py [--threads 1] [--quick]

- unet_vs_svd.py: VideoUNet training step vs diffusers' SVD U-Net (time ratio, peak memory, fp32 / bf16, profile)
- mfu.py: model FLOP utilisation of the video U-Net step against the measured fp32 / bf16 matmul peak
- data_throughput.py: latent-cache vs on-the-fly-encoding training throughput
(The rollout benchmark, benchmarks/rollout_memory.py, is run on its own.)

`--threads` defaults to 1: on the shared 2-core machine these numbers were taken on (load average 4-8 from other
jobs), two OpenMP threads stall at every op's barrier whenever one is descheduled (a step took ~4x longer than with
one thread). Pass `--threads 0` for torch's default on a machine of your own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, not for reporting)")
    args = ap.parse_args()
    threads = ["--threads", str(args.threads)] if args.threads else []
    quick = args.quick
    runs = [  # --quick results go to <name>-quick.json, never over the reported ones
        ["unet_vs_svd.py", "--profile", "--repeats", "3" if quick else "7", "--out",
         "unet_vs_svd-quick" if quick else "unet_vs_svd"],
        ["mfu.py", "--repeats", "3" if quick else "7", "--out", "mfu-quick" if quick else "mfu"],
        ["data_throughput.py", "--rounds", "2" if quick else "5", "--out",
         "data_throughput-quick" if quick else "data_throughput"],
    ]
    failed = []
    for script, *extra in runs:
        print(f"\n### {script}", flush=True)
        r = subprocess.run([sys.executable, str(HERE / script), *extra, *threads])
        if r.returncode:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
