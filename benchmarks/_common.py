"""Shared helpers of the performance benchmarks (`unet_vs_svd.py`, `mfu.py`, `data_throughput.py`).

Imported by those scripts as a sibling module (a script's own folder is first on `sys.path`); not a package.

- `machine()`: what the numbers were measured on (CPU model, cores torch uses, torch/diffusers versions, date).
- `alternate(fns, repeats)`: time several callables in the same process, round-robin, so a noisy neighbour on
  the shared machine slows every contender alike; medians are reported.
- `peak_rss_of(argv)`: peak resident memory of a fresh subprocess (`VmHWM` of its own /proc status: `ru_maxrss`
  of a child would include the forking parent's peak).
- `write_result(name, result)`: `benchmarks/results/<name>.json`, written atomically.
- `table(title, columns, rows)`: a rich table on stdout.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Where and when: CPU model, logical CPUs, torch threads, ISA flags that matter for bf16, versions, UTC date."""
    cpu, flags = platform.processor() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "isa": isa,
        "torch": torch.__version__, "diffusers": diffusers_version, "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M"), "loadavg_at_start": load,
        "note": "2-core CPU shared with other jobs: timings are medians of interleaved repeats",
    }


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every callable `warmup` times, then `repeats` rounds of each in turn; seconds per call per name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        # alternate the order too, so neither contender always runs right after the other
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def summary(seconds: list[float]) -> dict:
    """Median, min, max, interquartile range and count of a list of timings (seconds)."""
    q = statistics.quantiles(seconds, n=4) if len(seconds) >= 2 else [seconds[0]] * 3
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "q1_s": q[0], "q3_s": q[2], "n": len(seconds)}


def vm_hwm_bytes() -> int:
    """Peak resident set size of this process so far (`VmHWM`), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def vm_rss_bytes() -> int:
    """Current resident set size of this process (`VmRSS`), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def run_json_subprocess(argv: list[str], timeout: float = 600) -> dict:
    """Run `python argv...` in a fresh process and parse the JSON object on its last stdout line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"subprocess {argv} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def fvd_available(n_real: int) -> str | None:
    """None when FVD_16 can be computed on `n_real` real 16-frame windows (the project's I3D weights load), else
    the reason it cannot (a benchmark records it as skipped instead of failing after its expensive part)."""
    from drivesim.errors import WeightsError

    try:
        from drivesim.eval.i3d import load_i3d

        load_i3d("cpu")  # fail now, not after the rollouts
    except WeightsError as e:
        return f"I3D weights absent: {e}"
    if n_real < 2:
        return f"{n_real} real 16-frame window(s): a Frechet distance needs >= 2"
    return None


def write_result(name: str, result: dict) -> Path:
    """Write `result` to benchmarks/results/<name>.json (temp file + rename) and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Print a rich table (falls back to plain text without rich)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(str(c) for c in row))
        return
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*(str(c) for c in row))
    Console(width=160).print(t)


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"
