"""Can the temporal layers learn temporal coherence at all? A controlled latent-space experiment (no autoencoder).

Synthetic latent clips (8x16 latents, 32 frames): each clip has a per-clip random offset vector c (4 channels,
N(0, 0.8^2)) constant over time, plus a Gaussian blob moving at constant velocity, whose box conditions every
frame, plus small iid noise. A single frame says where the blob is (its box) but nothing about the other frames'
offset, so an image model sampling frames independently redraws c for every frame (flicker), while a video model
must carry the context frame's c forward.

Pipeline (all through the `drivesim train` CLI with the tiny preset): image LDM on single frames, then the
prediction and interpolation models from it; then, for every val window of 17 frames, the benchmark pipeline of
`video_ldm_temporal.py` (prediction of 5 key frames from the real first frame, stage-1 interpolation between
them), once as trained and once with every alpha forced to 1.

Reported, on the 16 generated frames vs the real ones: `diff1` = mean |z[t+1] - z[t]|; `offset_drift` = mean over
clips and channels of the std over time of the per-frame spatial mean (the offset c; ~0 for real clips);
`offset_err` = mean |per-frame spatial mean - that of frame 0 (the real context frame)|.

    python benchmarks/video_ldm_synthetic.py --out runs/vsyn --minutes 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch


def make_cache(path: Path, clips: int, val_clips: int, frames: int = 32, size: tuple[int, int] = (8, 16),
               seed: int = 0) -> Path:
    from drivesim.bbox_conditioning.boxes import pack_boxes
    from drivesim.datasets.latent_cache import LatentCacheWriter

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pattern = np.array([1.5, -1.0, 1.0, -1.5], np.float32)
    with LatentCacheWriter(path, encoder_id="synthetic", scale_factor=1.0, max_boxes=8) as writer:
        for i in range(clips + val_clips):
            c = rng.normal(0, 0.8, 4).astype(np.float32)
            x0, y0 = rng.uniform(3, w - 3), rng.uniform(2, h - 2)
            v = rng.uniform(-0.25, 0.25)
            z = np.empty((frames, 4, h, w), np.float32)
            boxes = []
            for k in range(frames):
                x = np.clip(x0 + v * k, 1.5, w - 1.5)
                blob = np.exp(-((xx - x) ** 2 + (yy - y0) ** 2) / (2 * 1.2 ** 2))
                z[k] = c[:, None, None] + pattern[:, None, None] * blob + rng.normal(0, 0.1, (4, h, w))
                # boxes in pixels of the 8x-larger image the latents would decode to
                boxes.append([(0, 0, 8 * (x - 1.5), 8 * (y0 - 1.5), 8 * (x + 1.5), 8 * (y0 + 1.5))])
            writer.add_clip(f"clip_{i:04d}", z, pack_boxes(boxes, 8 * w, 8 * h, 8), night=i % 2, crowdedness=1,
                            fps=10.0, split="train" if i < clips else "val", width=8 * w, height=8 * h)
    return path


def measures(z: np.ndarray) -> dict[str, float]:
    """z: (n, t, c, h, w) latents."""
    means = z.mean(axis=(3, 4))  # (n, t, c): the offset seen per frame
    return {"diff1": float(np.abs(np.diff(z, axis=1)).mean()),
            "offset_drift": float(means.std(axis=1).mean()),
            "offset_err": float(np.abs(means[:, 1:] - means[:, :1]).mean())}


def main(argv: list[str] | None = None) -> dict:
    from drivesim.cli.main import main as cli
    from drivesim.datasets.latent_cache import LatentClipDataset
    from video_ldm_temporal import fill_keys, generate, predict_keys

    import drivesim
    from drivesim.nn.temporal import AlphaBlender, force_alpha_one

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=3.0, help="training time cap of each of the 3 models")
    ap.add_argument("--train-steps", default="400,300,300", help="max steps: image LDM, prediction, interpolation")
    ap.add_argument("--size", default="8x16", help="latent HxW")
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--val-clips", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the models already in OUT")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    size = tuple(int(v) for v in args.size.split("x"))
    cache = args.out / "latents.h5"
    if not args.eval_only:
        make_cache(cache, args.clips, args.val_clips, size=size)
    max_steps = dict(zip(("image_ldm", "prediction", "interpolation"), args.train_steps.split(","), strict=True))
    common = ["--preset", "tiny", "--data", str(cache), "--max-minutes", str(args.minutes),
              "--no-progress", "--set", f"train.lr={args.lr}", "--set", "train.ema_decay=0.99"]
    timings = {}
    if args.eval_only:
        max_steps = {}
    from_image = ["--set", "train.batch_size=8", "--opt", f"image_ldm={args.out / 'image_ldm'}"]
    for stage, extra in (("image_ldm", ["--set", "train.batch_size=32"]), ("prediction", from_image),
                         ("interpolation", from_image))[:len(max_steps)]:
        t0 = time.time()
        if cli(["train", stage, "--out", str(args.out / stage), "--max-steps", max_steps[stage], *common, *extra]):
            raise SystemExit(f"training {stage} failed")
        timings[stage] = round(time.time() - t0, 1)

    torch.set_grad_enabled(False)
    report_steps = {}
    for stage in ("image_ldm", "prediction", "interpolation"):
        ckpts = sorted((args.out / stage / "checkpoints").glob("step_*"))
        report_steps[stage] = int(ckpts[-1].name.split("_")[1]) if ckpts else None
    pred = drivesim.load(args.out / "prediction" / "model-ema")
    interp = drivesim.load(args.out / "interpolation" / "model-ema")
    val = LatentClipDataset(cache, split="val", num_frames=17, frame_stride=1)
    firsts = {}
    for i, (clip, _start) in enumerate(val.windows):
        firsts.setdefault(clip, []).append(i)
    indices = [i for clip in sorted(firsts) for i in (firsts[clip][0], firsts[clip][-1])]
    items = [val[i] for i in indices]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if isinstance(items[0][k], torch.Tensor)}
    out = {"real": batch["latents"][:, :16].numpy()}
    real_keys = batch["latents"][:, [0, 4, 8, 12, 16]].float()
    out["keys_real"] = real_keys.numpy()
    t0 = time.time()
    for name in ("video", "alpha1"):  # whole pipeline; prediction alone; interpolation alone (real key frames)
        with force_alpha_one(pred) if name == "alpha1" else contextlib.nullcontext(), \
                force_alpha_one(interp) if name == "alpha1" else contextlib.nullcontext():
            out[name] = generate(pred, interp, batch, args.steps, 0, None, None)[:, :16].numpy()
            out[f"keys_{name}"] = predict_keys(pred, batch, args.steps, 0, None, None).numpy()
            out[f"interp_real_keys_{name}"] = fill_keys(interp, batch, real_keys, args.steps, 1, None,
                                                        None)[:, :16].numpy()
    alphas = {name: [round(float(m.alpha()), 3) for m in model.modules() if isinstance(m, AlphaBlender)]
              for name, model in (("prediction", pred), ("interpolation", interp))}
    report = {"windows": len(indices), "sampler_steps": args.steps, "generation_s": round(time.time() - t0, 1),
              "train_wall_s": timings, "train_steps": report_steps,
              "measures": {k: measures(v) for k, v in out.items()},
              "alphas": {k: {"min": min(v), "max": max(v), "mean": float(np.mean(v))} for k, v in alphas.items()}}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print("| clips | diff1 | offset_drift | offset_err |\n|---|---|---|---|")
    for k, m in report["measures"].items():
        print(f"| {k} | {m['diff1']:.4f} | {m['offset_drift']:.4f} | {m['offset_err']:.4f} |")
    print(json.dumps({k: report[k] for k in ("windows", "generation_s", "train_wall_s", "train_steps", "alphas")}))
    return report


if __name__ == "__main__":
    main()
