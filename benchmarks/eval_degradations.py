"""FVD_16 / FID / KVD_16 of real clips against themselves and against degraded copies.

    python benchmarks/eval_degradations.py [DATASET] [--split val] [--max-clips N] [--out results.json]

DATASET defaults to the committed sample `data/sample` (val split). Degraded copies are written to a temp
folder with `drivesim.eval.protocols.degrade_dataset`: "reencode" (same pixels through the codec again: the
floor that the codec alone adds), "blur" (Gaussian, sigma 2 px) and "shuffle" (frames permuted within each
clip). Every comparison uses all non-overlapping 16-frame windows (N printed). Expected: identity ~0; blur raises
both FVD and FID; shuffle raises FVD far more than FID (same frames, broken motion), which the ratio columns
(metric / metric of the blurred copy) show on each metric's own scale. Needs the evaluator weights.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from drivesim.datasets.clips import read_manifest, write_json_atomic, write_manifest
from drivesim.eval.protocols import default_extractors, degrade_dataset, evaluate_videos

REPO = Path(__file__).resolve().parents[1]


def _subset(src: Path, dst: Path, split: str | None, max_clips: int | None) -> Path:
    """A manifest-only view of the first `max_clips` clips of `split` (the media files are symlinked)."""
    manifest = read_manifest(src)
    entries = (manifest.clips if split is None else manifest.split(split))[:max_clips]
    dst.mkdir(parents=True)
    for e in entries:
        for f in (e.video, e.annotation):
            (dst / f.name).symlink_to(f.resolve())
    write_manifest(dst, [(e.clip_id, e.split) for e in entries], source=f"subset of {src}")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", nargs="?", default=str(REPO / "data" / "sample"))
    ap.add_argument("--split", default="val", help="split to use ('all' for every clip)")
    ap.add_argument("--max-clips", type=int, default=None)
    ap.add_argument("--sigma", type=float, default=2.0)
    ap.add_argument("--kinds", default="reencode,blur,shuffle", help="degradations to compare (blur is required)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_degradations.json"))
    args = ap.parse_args()
    split = None if args.split == "all" else args.split
    ex = default_extractors()
    caches: dict = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="drivesim-degrade-") as tmp:
        real = _subset(Path(args.dataset), Path(tmp) / "real", split, args.max_clips)
        fakes = {"identity (real vs real)": real}
        for kind in args.kinds.split(","):
            fakes[kind] = degrade_dataset(real, Path(tmp) / kind, kind=kind, sigma=args.sigma, seed=0)
        for name, fake in fakes.items():
            t0 = time.perf_counter()
            rec = evaluate_videos(real, fake, extractors=ex, feature_caches=caches, seed=0)
            m = rec["metrics"]
            rows.append({"comparison": name, "fvd": m["fvd"]["mean"], "fid": m["fid"]["mean"],
                         "kvd": m["kvd"]["mean"], "kvd_subset_std": m["kvd"]["subset_std"][0],
                         "n": rec["protocol"]["n"], "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name}: done in {rows[-1]['seconds']} s", flush=True)
        protocol = rec["protocol"]
    blur = next(r for r in rows if r["comparison"] == "blur")
    for r in rows:
        r["fvd_over_blur"] = r["fvd"] / blur["fvd"]
        r["fid_over_blur"] = r["fid"] / blur["fid"]
    print(f"\ndataset {args.dataset} (split {args.split}), N = {rows[0]['n']} 16-frame windows per side, "
          f"all windows, seed 0")
    print(f"{'comparison':26s} {'FVD_16':>10s} {'FID':>10s} {'KVD_16':>10s} {'FVD/blur':>9s} {'FID/blur':>9s}")
    for r in rows:
        print(f"{r['comparison']:26s} {r['fvd']:10.4f} {r['fid']:10.4f} {r['kvd']:10.4f} "
              f"{r['fvd_over_blur']:9.3f} {r['fid_over_blur']:9.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"benchmark": "eval_degradations", "dataset": str(Path(args.dataset).resolve()),
                            "split": args.split, "max_clips": args.max_clips, "sigma": args.sigma, "rows": rows,
                            "protocol": protocol})
    print(f"wrote {out}")
    print(json.dumps({r["comparison"]: [round(r["fvd"], 4), round(r["fid"], 4)] for r in rows}))


if __name__ == "__main__":
    main()
