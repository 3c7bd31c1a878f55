"""Model FLOP utilisation of the video U-Net's training step on this CPU, fp32 and bf16 autocast.

    python benchmarks/mfu.py [--preset cpu-small] [--batch-size 2] [--repeats 7] [--matmul-size 2048]

MFU = (FLOPs of one training step, counted by `torch.utils.flop_counter.FlopCounterMode`: forward + backward of
every matmul/conv/attention, elementwise ops not counted, as usual for MFU) / (median step time) / (matmul peak).
The peak is the median throughput of a large square matmul (`--matmul-size`, fp32 and bf16) measured in the
same process, interleaved with the model steps (round-robin), so both see the same load on the shared machine.

Rows: the prediction model's VideoUNet with every parameter trainable, and with the spatial layers frozen (the
real prediction stage: no weight gradients for them, hence fewer FLOPs). Target: MFU >= 40%.
Writes benchmarks/results/mfu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, not the repo root
import _common  # noqa: E402
import unet_vs_svd  # noqa: E402

TARGET_MFU = 0.40


def matmul_fn(n: int, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """(callable doing one n x n @ n x n matmul in `dtype` on `device`, its FLOPs = 2 n^3)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    return (lambda: torch.mm(a, b)), 2 * n**3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="mfu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = unet_vs_svd._preset(args.preset)
    models = {k: unet_vs_svd.build(k, preset, args.batch_size) for k in ("ours", "ours_frozen")}
    result: dict = {"benchmark": "mfu", "machine": _common.machine(), "preset": args.preset,
                    "batch_size": args.batch_size, "num_frames": preset.prediction.num_frames,
                    "matmul_size": args.matmul_size,
                    "method": "FlopCounterMode FLOPs per step / median step time / median large-matmul "
                              "throughput, interleaved in one process", "precisions": {}}
    rows = []
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        mm, mm_flops = matmul_fn(args.matmul_size, dtype)
        steps = {k: unet_vs_svd.make_step(m, f, t, precision) for k, (m, f, t) in models.items()}
        flops = {k: unet_vs_svd.count_flops(s) for k, s in steps.items()}
        # several matmuls per "call" so a peak sample lasts about as long as a model step
        calls = {"matmul": lambda mm=mm: [mm() for _ in range(4)], **steps}
        times = _common.alternate(calls, args.repeats)
        peak = 4 * mm_flops / _common.summary(times["matmul"])["median_s"]
        best_peak = 4 * mm_flops / min(times["matmul"])
        per = {"matmul_peak_flops_per_s": peak, "matmul_best_flops_per_s": best_peak,
               "matmul_times_s": times["matmul"]}
        for k in steps:
            s = _common.summary(times[k])
            achieved = flops[k] / s["median_s"]
            per[k] = {**s, "times_s": times[k], "flops_per_step": flops[k], "achieved_flops_per_s": achieved,
                      "mfu": achieved / peak, "mfu_vs_best_peak": achieved / best_peak,
                      "target_met": bool(achieved / peak >= TARGET_MFU)}
            rows.append([precision, k, f"{flops[k] / 1e9:.1f}", f"{s['median_s'] * 1e3:.0f}",
                         f"{achieved / 1e9:.1f}", f"{peak / 1e9:.1f}", f"{100 * achieved / peak:.1f}%",
                         _common.verdict(achieved / peak >= TARGET_MFU)])
        result["precisions"][precision] = per
    m = result["machine"]
    _common.table(f"Video U-Net MFU, train step, {args.preset} b={args.batch_size} t={result['num_frames']}; "
                  f"{m['cpu']}, {m['torch_threads']} threads (shared machine), {m['date_utc']} UTC; target >= 40%",
                  ["precision", "model", "GFLOP/step", "median ms", "achieved GFLOP/s",
                   f"matmul {args.matmul_size}^3 GFLOP/s", "MFU", "target"], rows)
    path = _common.write_result(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
