"""Does the video upsampler's temporal layers help? x4 upsampling of real val windows by the trained video
upsampler vs the same model with every alpha forced to 1 (the image upsampler: frames upsampled independently),
vs a bicubic upsampling of the low-resolution input (no model). Video LDM (Blattmann et al. 2023, Table 3):
video upsampler FVD 45.39 vs image upsampler 165.98.

For each val window (two non-overlapping 16-frame windows per val clip, frames 0-15 and 16-31 on the sample):
1. the real frames (at `--size`, the model's training resolution by default: 128x256) are area-downsampled x
   `scale` exactly as `Upsampler.loss` makes its low-resolution input (`area_downsample`: 128x256 -> 32x64);
2. `Upsampler.upsample` brings them back x `scale` at a fixed noise-augmentation level (`--noise-level`), in
   the model's chunks of `chunk_frames` frames; the same call again under `force_alpha_one` with the same
   generator seed, so both variants start from the same initial and augmentation noise;
3. bicubic: `F.interpolate(lowres, x scale, bicubic)`, clipped to [-1, 1].

Metrics, each against the real window it came from (unlike generated clips, upsampled ones have a ground truth):
- FVD_16 (the project's I3D, `drivesim eval weights --name i3d`) of the upsampled windows vs the real windows;
  skipped with the reason in the report when the weights are absent or there are fewer than 2 windows;
- PSNR (dB, uint8 pixels, per frame, averaged over frames and windows);
- flicker as in `video_ldm_temporal.py` (same functions): diff1 = mean |x[t+1] - x[t]|, diff2 =
  mean |x[t+1] - 2 x[t] + x[t-1]| on [0, 1] pixels, to compare with the real clips' values;
- temporal error (paired, needs the ground truth): mean |(x[t+1] - x[t]) - (r[t+1] - r[t])| on [0, 1] pixels,
  r the real window: how far each frame-to-frame change is from the real one (0 for a perfect copy);
- `video_vs_alpha1`: mean |video - alpha1| on [0, 1] pixels: how much the temporal layers change the output at
  all (0 means they are inert, e.g. still near their zero initialisation).
Sampling seeds (`--seeds`): seed, seed + 1000, ...; every model row is mean +- sample std over seeds.

Cost: the sampler runs the U-Net on whole frames (at cpu-small with spatial self-attention over all 8192 tokens of
the 64x128 feature map of a 128x256 frame: ~70% of the time), `steps` times, twice per window (video, alpha1).
Measured on one thread of the shared 2-core CPU (load ~2-4), per 16-frame window and sampler step, video + alpha1:
~165 s at 128x256, ~25 s for 64x128 crops, ~10 s for 64x64 crops (`--crop`, the cpu-small training patch). The
full val set (32 windows) at 128x256 and 10 steps is therefore ~15 h on one thread; the report records the seconds
per window and the estimate for the full val set: check it on one clip (`--max-clips 1`) first.

    python benchmarks/upsampler_temporal.py --data data/sample --upsampler runs/ups/model-ema --out runs/ups_eval

Writes OUT/report.json, OUT/i3d_features.npz (when FVD ran) and OUT/filmstrip.png (rows: real, video, alpha1,
bicubic, low-res input; the first 8 frames of the first window), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, not the repo root
from _common import machine  # noqa: E402
from video_ldm_temporal import _real_windows, _to_uint8, flicker_measures  # noqa: E402

PAPER = {"video": 45.39, "alpha1": 165.98}  # Video LDM Table 3, FVD of the upsampled driving videos


def psnr(videos: np.ndarray, real: np.ndarray) -> float:
    """Mean over frames of 10 log10(255^2 / MSE) of (n, t, h, w, 3) uint8 against the real frames, dB."""
    err = (videos.astype(np.float64) - real.astype(np.float64)) ** 2
    mse = np.maximum(err.mean(axis=(2, 3, 4)), 1e-10)  # a frame copied exactly would be infinite
    return float((10 * np.log10(255.0**2 / mse)).mean())


def temporal_error(videos: np.ndarray, real: np.ndarray) -> float:
    """mean |(x[t+1] - x[t]) - (r[t+1] - r[t])| on [0, 1] pixels of (n, t, h, w, 3) uint8 vs the real windows."""
    dx = np.diff(videos.astype(np.float64) / 255.0, axis=1)
    dr = np.diff(real.astype(np.float64) / 255.0, axis=1)
    return float(np.abs(dx - dr).mean())


def to_model(windows: np.ndarray) -> torch.Tensor:
    """(b, t, h, w, 3) uint8 -> (b, t, 3, h, w) float32 in [-1, 1] (the `ClipDataset` scaling)."""
    return rearrange(torch.from_numpy(windows).float() / 127.5 - 1.0, "b t h w c -> b t c h w")


def bicubic(lowres: torch.Tensor, scale: int) -> torch.Tensor:
    """(b, t, 3, h, w) -> (b, t, 3, scale h, scale w) bicubic, clipped to [-1, 1]."""
    b = lowres.shape[0]
    x = F.interpolate(rearrange(lowres, "b t c h w -> (b t) c h w"), scale_factor=scale, mode="bicubic",
                      align_corners=False)
    return rearrange(x, "(b t) c h w -> b t c h w", b=b).clamp(-1, 1)


def filmstrip(rows: dict[str, np.ndarray], path: Path, frames: int = 8) -> None:
    """One PNG: a labelled row of the first `frames` frames of each (t, h, w, 3) uint8 video, all the same size."""
    import cv2

    lines = []
    for name, video in rows.items():
        h, w = video.shape[1:3]
        label = np.full((h, 72, 3), 255, np.uint8)
        cv2.putText(label, name, (2, h // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        tiles = [label]
        for k in range(min(frames, video.shape[0])):
            tiles += [video[k], np.full((h, 2, 3), 255, np.uint8)]
        lines += [np.concatenate(tiles[:-1], axis=1), np.full((2, tiles[0].shape[1] + sum(
            t.shape[1] for t in tiles[1:-1]), 3), 255, np.uint8)]
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(lines[:-1], axis=0), cv2.COLOR_RGB2BGR))


def _parse_size(text: str) -> tuple[int, int]:
    """"HxW" -> (h, w); argparse reports the ValueError of a malformed value."""
    h, w = (int(v) for v in text.lower().split("x"))
    if h < 1 or w < 1:
        raise ValueError(text)
    return h, w


def main(argv: list[str] | None = None) -> dict:
    from drivesim.datasets.clips import load_clip, read_manifest
    from drivesim.eval.features import i3d_embeddings
    from drivesim.eval.metrics import fvd
    from drivesim.eval.results import write_json

    import drivesim
    from drivesim.errors import WeightsError
    from drivesim.models.upsampler import Upsampler, area_downsample
    from drivesim.nn.temporal import AlphaBlender, force_alpha_one

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="clip-format dataset (its val clips are the real set)")
    ap.add_argument("--upsampler", type=Path, required=True, help="exported upsampler (OUT/model-ema of training)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=_parse_size, default=None,
                    help="HxW of the real (high-resolution) frames; default: the dataset's own (128x256 on the "
                         "sample). Must be a multiple of the model's scale and U-Net downsampling after / scale")
    ap.add_argument("--crop", type=_parse_size, default=None,
                    help="HxW centre crop of the real frames (after --size), upsampled instead of whole frames: the "
                         "content keeps its scale and the cost drops with the pixels (64x64: the cpu-small "
                         "training patch)")
    ap.add_argument("--steps", type=int, default=10,
                    help="sampler steps (the cpu-small config's 50 are far too slow on one CPU thread)")
    ap.add_argument("--sampler", default=None, help="ddim | ddpm | dpmpp (default: the model's config)")
    ap.add_argument("--noise-level", type=int, default=50,
                    help="noise-augmentation level g of the low-res conditioning (training: g ~ U{0..max})")
    ap.add_argument("--max-clips", type=int, default=None, help="first N val clips (2 windows each on the sample)")
    ap.add_argument("--batch", type=int, default=2, help="windows per upsample call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1,
                    help="sampling seeds (seed, seed + 1000, ...): video and alpha1 are upsampled once per seed "
                         "and reported as mean +- std over seeds")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here (benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds: {args.seeds} must be >= 1")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps: {args.steps} must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)

    model = drivesim.load(args.upsampler)
    if not isinstance(model, Upsampler):
        ap.error(f"--upsampler: {args.upsampler} holds a {type(model).__name__}, not an Upsampler")
    model.eval()
    scale = model.config.scale
    val_entries = [e for e in read_manifest(args.data).clips if e.split == "val"]
    if not val_entries:
        ap.error(f"--data: {args.data} has no val clips")
    size = args.size or tuple(load_clip(min(val_entries, key=lambda e: e.clip_id))[0].shape[1:3])
    if size[0] % scale or size[1] % scale:
        ap.error(f"--size: {size[0]}x{size[1]} is not a multiple of the upsampler's scale {scale}")
    real_by_clip = _real_windows(args.data, tuple(size), 16, args.max_clips)
    if not real_by_clip or not sum(len(v) for v in real_by_clip.values()):
        ap.error(f"--data: {args.data} has no val clip with 16 frames")
    real = np.concatenate(list(real_by_clip.values()))  # (n, 16, h, w, 3) uint8
    if args.crop:
        ch, cw = args.crop
        if ch > size[0] or cw > size[1] or ch % scale or cw % scale:
            ap.error(f"--crop: {ch}x{cw} must fit in {size[0]}x{size[1]} and be a multiple of the scale {scale}")
        # centred, on the scale grid, so the area downsampling of the crop is the crop of the downsampled frame
        top, left = (size[0] - ch) // 2 // scale * scale, (size[1] - cw) // 2 // scale * scale
        real = np.ascontiguousarray(real[:, :, top:top + ch, left:left + cw])
        real_by_clip = {k: v[:, :, top:top + ch, left:left + cw] for k, v in real_by_clip.items()}
    fvd_skipped = None
    try:
        from drivesim.eval.i3d import load_i3d

        load_i3d("cpu")  # fail now, not after the sampling
    except WeightsError as e:
        fvd_skipped = f"I3D weights absent: {e}"
    if fvd_skipped is None and len(real) < 2:
        fvd_skipped = f"{len(real)} window(s): a Frechet distance needs >= 2"

    # windows of the whole val set (every val clip has the same length in a generated dataset), for the estimate
    full_windows = len(val_entries) * len(real) // len(real_by_clip)
    seeds = [args.seed + 1000 * k for k in range(args.seeds)]
    gen: dict[str, list[np.ndarray]] = {"bicubic": [], "lowres": []}
    for seed in seeds:
        gen[f"video/{seed}"], gen[f"alpha1/{seed}"] = [], []
    seconds = {"video": 0.0, "alpha1": 0.0}
    t_start = time.time()
    with torch.no_grad():
        for s in range(0, len(real), args.batch):
            x = to_model(real[s:s + args.batch])
            low = area_downsample(x, scale)
            gen["bicubic"].append(_to_uint8(bicubic(low, scale)))
            gen["lowres"].append(_to_uint8(F.interpolate(low.flatten(0, 1), scale_factor=scale, mode="nearest")
                                           .unflatten(0, low.shape[:2])))
            for seed in seeds:
                for name in ("video", "alpha1"):
                    t0 = time.perf_counter()
                    with force_alpha_one(model) if name == "alpha1" else contextlib.nullcontext():
                        y = model.upsample(low, noise_level=args.noise_level, steps=args.steps, sampler=args.sampler,
                                           generator=torch.Generator().manual_seed(seed + s))
                    seconds[name] += time.perf_counter() - t0
                    gen[f"{name}/{seed}"].append(_to_uint8(y))
            done = min(s + args.batch, len(real))
            print(f"windows {done}/{len(real)}  {time.time() - t_start:.0f}s  (sampling all {full_windows} val "
                  f"windows: ~{(time.time() - t_start) / done * full_windows / 60:.1f} min)", flush=True)
    gen = {k: np.concatenate(v) for k, v in gen.items()}
    gen_s = time.time() - t_start
    per_window_s = {k: v / (len(real) * len(seeds)) for k, v in seconds.items()}

    feats: dict[str, np.ndarray] = {}
    if fvd_skipped is None:
        feats = {"real": i3d_embeddings(real)}
        feats.update({k: i3d_embeddings(v) for k, v in gen.items() if k != "lowres"})
    fvd_s = time.time() - t_start - gen_s

    def metrics(name: str) -> dict:
        v = gen[name]
        return {"fvd": None if fvd_skipped else fvd(feats["real"], feats[name]), "psnr": psnr(v, real),
                "temporal_error": temporal_error(v, real), **flicker_measures(v)}

    bicubic_row = metrics("bicubic")
    per_seed = {}
    for seed in seeds:
        rows = {n: metrics(f"{n}/{seed}") for n in ("video", "alpha1")}
        diff = np.abs(gen[f"video/{seed}"].astype(np.float64) - gen[f"alpha1/{seed}"]) / 255.0
        per_seed[str(seed)] = rows | {"video_vs_alpha1": float(diff.mean())}

    def spread(values: list[float | None]) -> dict | None:
        if any(v is None for v in values):
            return None
        a = np.asarray(values, dtype=np.float64)
        return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                "min": float(a.min()), "max": float(a.max())}

    summary = {f"{m}/{n}": spread([per_seed[str(seed)][n][m] for seed in seeds])
               for m in ("fvd", "psnr", "temporal_error", "diff1", "diff2") for n in ("video", "alpha1")}
    summary["video_vs_alpha1"] = spread([per_seed[str(seed)]["video_vs_alpha1"] for seed in seeds])
    # paired per seed: the same noise for both variants, so the difference has less spread than either
    summary["fvd_gain"] = spread([None if fvd_skipped else r["alpha1"]["fvd"] - r["video"]["fvd"]
                                  for r in per_seed.values()])
    blenders = [float(m.alpha().detach()) for m in model.modules() if isinstance(m, AlphaBlender)]
    low_hw = [int(gen["lowres"].shape[2] // scale), int(gen["lowres"].shape[3] // scale)]
    report = {
        "benchmark": "upsampler_temporal",
        "protocol": "two non-overlapping 16-frame windows of every val clip; real frames area-downsampled x scale "
                    "(as in training), upsampled by the video upsampler, by the same with every alpha = 1 (same "
                    "seeds and noise level) and bicubically; FVD_16 (I3D), PSNR, flicker and temporal error "
                    "against the real windows; one trained model, sampling seeds vary",
        "paper": {"fvd": PAPER, "source": "Video LDM (Blattmann et al. 2023) Table 3, 512x1024 driving"},
        "upsampler": str(args.upsampler), "data": str(args.data),
        "windows": int(len(real)), "clips": len(real_by_clip), "frames": 16, "scale": scale,
        "lowres": low_hw, "resolution": [int(v) for v in size], "crop": list(args.crop) if args.crop else None,
        "steps": args.steps, "sampler": args.sampler or model.config.diffusion.sampler,
        "noise_level": args.noise_level, "seeds": seeds, "batch": args.batch, "chunk_frames": model.config.chunk_frames,
        "generation_s": round(gen_s, 1), "fvd_s": round(fvd_s, 1),
        "seconds_per_window": {k: round(v, 2) for k, v in per_window_s.items()},
        # sampling + I3D time of this run scaled to every val window (I3D: 0 when FVD was skipped)
        "full_val_windows": full_windows,
        "estimate_full_val_s": round((gen_s + fvd_s) / len(real) * full_windows, 1),
        "fvd_skipped": fvd_skipped,
        "real": {"psnr": None, "temporal_error": 0.0, **flicker_measures(real)},
        "bicubic": bicubic_row,
        "per_seed": per_seed,
        "summary": summary,
        "alphas": {"n": len(blenders), "min": min(blenders, default=None), "max": max(blenders, default=None),
                   "mean": float(np.mean(blenders)) if blenders else None},
        "machine": machine(),
    }
    filmstrip({"real": real[0], "video": gen[f"video/{seeds[0]}"][0], "alpha=1": gen[f"alpha1/{seeds[0]}"][0],
               "bicubic": gen["bicubic"][0], f"low x{scale}": gen["lowres"][0]}, args.out / "filmstrip.png")
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)
    if feats:
        np.savez_compressed(args.out / "i3d_features.npz", **{k.replace("/", "_"): v for k, v in feats.items()})

    def cell(m: str, n: str, fmt: str) -> str:
        if n == "bicubic":
            v = bicubic_row[m]
            return "-" if v is None else format(v, fmt)
        r = summary[f"{m}/{n}"]
        return "-" if r is None else f"{r['mean']:{fmt}} +- {r['std']:{fmt}}"

    hw = args.crop or size
    print(f"{len(real)} windows {low_hw[0]}x{low_hw[1]} -> {hw[0]}x{hw[1]}"
          f"{f' (crops of {size[0]}x{size[1]})' if args.crop else ''}, {report['steps']} "
          f"{report['sampler']} steps, noise level {args.noise_level}, {len(seeds)} seed(s) (mean +- sample std)"
          + (f"; FVD skipped: {fvd_skipped}" if fvd_skipped else ""))
    print("| upsampler | FVD_16 vs real | PSNR dB | temporal error | diff1 | diff2 |\n|---|---|---|---|---|---|")
    print(f"| real | 0 | - | 0 | {report['real']['diff1']:.4f} | {report['real']['diff2']:.4f} |")
    for n, label in (("video", "video upsampler"), ("alpha1", "alpha = 1 (image)"), ("bicubic", "bicubic")):
        print(f"| {label} | {cell('fvd', n, '.1f')} | {cell('psnr', n, '.2f')} | {cell('temporal_error', n, '.4f')} "
              f"| {cell('diff1', n, '.4f')} | {cell('diff2', n, '.4f')} |")
    print(json.dumps({k: report[k] for k in ("windows", "generation_s", "fvd_s", "seconds_per_window",
                                             "full_val_windows", "estimate_full_val_s", "alphas")} | {
        "video_vs_alpha1": summary["video_vs_alpha1"]}))
    return report


if __name__ == "__main__":
    main()
