"""Do the temporal layers help? FVD and flicker of 16-frame clips from the video LDMs vs the same models with
every alpha forced to 1 (frames independent), on the val clips.

For each val window of 17 latent frames (starts 0 and t - 17 of every val clip of the latent cache):
1. key frames: the prediction model continues the window's first real latent frame (S = 1 context) to 5 key
   frames at stride 4 (frames 0, 4, 8, 12, 16; 2.5 fps on the 10 fps sample), conditioned on the boxes and
   labels of those frames;
2. the interpolation model (stage label 1, 4T -> 16T) fills the 3 frames between each pair of key frames,
   conditioned on the boxes of every frame;
3. the autoencoder decodes the first 16 frames.
The same pipeline runs again with `force_alpha_one` on both models (same seeds): every generated frame is then
the image model's (the context and key frames cannot reach other frames). Real clips: the val clips' own frames,
two non-overlapping 16-frame windows per clip. Also reported: the autoencoder's reconstruction of the real
windows (a floor for what the generators can reach through this decoder).

Flicker (no ground truth for generated clips): on [0, 1] pixels, `diff1` = mean |x[t+1] - x[t]| (how much
changes per frame) and `diff2` = mean |x[t+1] - 2 x[t] + x[t-1]| (temporal second difference: jitter; smooth
motion has small diff2, independent frames large). Compare each with the real clips' values.

    python benchmarks/video_ldm_temporal.py --data data/sample --cache runs/latents.h5 --ae runs/vdec/model \\
        --prediction runs/pred/model-ema --interpolation runs/interp/model-ema --out runs/video_eval

Also FVD_16 against the reconstructions (`fvd_vs_recon`): with a weak autoencoder, FVD against real clips has the
decoder's floor under it for every generator, which can hide what the temporal layers change.

Writes OUT/report.json, OUT/i3d_features.npz, OUT/filmstrip_{real,video,alpha1}.png (8 frames of the first window,
boxes drawn) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _real_windows(data: Path, size: tuple[int, int], length: int, max_clips: int | None) -> dict[str, np.ndarray]:
    """clip id -> (n, length, h, w, 3) uint8 non-overlapping windows of that val clip."""
    from drivesim.datasets.clips import load_clip, read_manifest
    from drivesim.datasets.transforms import resize_frames

    out = {}
    entries = sorted((e for e in read_manifest(data).clips if e.split == "val"), key=lambda e: e.clip_id)
    for e in entries[:max_clips]:
        frames, ann = load_clip(e)
        if frames.shape[1:3] != size:
            frames = resize_frames(frames, size)
        out[ann.clip_id] = np.stack([frames[s:s + length] for s in range(0, frames.shape[0] - length + 1, length)])
    return out


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(b, t, 3, h, w) in [-1, 1] -> (b, t, h, w, 3) uint8."""
    x = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).cpu().numpy()


def flicker_measures(videos: np.ndarray) -> dict[str, float]:
    """diff1 = mean |x[t+1] - x[t]|, diff2 = mean |x[t+1] - 2 x[t] + x[t-1]| on [0, 1] pixels of (n, t, h, w, 3)."""
    x = videos.astype(np.float64) / 255.0
    d1 = np.diff(x, axis=1)
    return {"diff1": float(np.abs(d1).mean()), "diff2": float(np.abs(np.diff(d1, axis=1)).mean())}


def _filmstrip(video: np.ndarray, boxes: np.ndarray | None, mask: np.ndarray | None, path: Path,
               frames: int = 8) -> None:
    """One row of `frames` frames of (t, h, w, 3) uint8 with the conditioning boxes (normalised xyxy) drawn."""
    import cv2

    tiles = []
    for k in range(frames):
        img = np.ascontiguousarray(video[k])
        h, w = img.shape[:2]
        if boxes is not None:
            for (x1, y1, x2, y2), valid in zip(boxes[k], mask[k], strict=True):
                if valid:
                    cv2.rectangle(img, (int(x1 * w), int(y1 * h)), (int(x2 * w), int(y2 * h)), (255, 220, 0), 1)
        tiles.append(img)
        tiles.append(np.full((h, 2, 3), 255, np.uint8))
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(tiles[:-1], axis=1), cv2.COLOR_RGB2BGR))


def _slice_cond(batch: dict, frames: list[int]):
    from drivesim.types import Conditioning

    return Conditioning(boxes=batch["boxes"][:, frames].float(), classes=batch["classes"][:, frames].long(),
                        box_mask=batch["box_mask"][:, frames].bool(), night=batch["night"].long(),
                        crowdedness=batch["crowdedness"].long())


@torch.no_grad()
def predict_keys(pred, batch: dict, steps: int | None, seed: int, guidance_scale: float | None,
                 context_guidance: float | None) -> torch.Tensor:
    """5 key frames (window frames 0, 4, 8, 12, 16) continued from the window's first real latent frame (S = 1).
    Returns (b, 5, c, h, w)."""
    return pred.predict(_slice_cond(batch, [0, 4, 8, 12, 16]), batch["latents"][:, :1].float(), steps=steps,
                        guidance_scale=guidance_scale, context_guidance=context_guidance,
                        generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def fill_keys(interp, batch: dict, keys: torch.Tensor, steps: int | None, seed: int, guidance_scale: float | None,
              context_guidance: float | None) -> torch.Tensor:
    """Stage-1 interpolation of the 4 gaps between 5 key frames (b, 5, c, h, w) with the boxes of every window
    frame. Returns (b, 17, c, h, w)."""
    from einops import rearrange

    from drivesim.types import Conditioning

    b = keys.shape[0]
    # the 4 gaps of every window as one batch of 5-frame windows
    conds = [_slice_cond(batch, list(range(4 * j, 4 * j + 5))) for j in range(4)]
    cond = Conditioning(**{f: rearrange(torch.stack([getattr(c, f) for c in conds], 1), "b j ... -> (b j) ...")
                           for f in ("boxes", "classes", "box_mask")},
                        night=batch["night"].long().repeat_interleave(4),
                        crowdedness=batch["crowdedness"].long().repeat_interleave(4))
    pairs = rearrange(torch.stack([keys[:, j:j + 2] for j in range(4)], 1), "b j k c h w -> (b j) k c h w")
    filled = interp.interpolate(cond, pairs, stage=1, steps=steps, guidance_scale=guidance_scale,
                                context_guidance=context_guidance, generator=torch.Generator().manual_seed(seed))
    filled = rearrange(filled, "(b j) t c h w -> b j t c h w", b=b)
    return torch.cat([filled[:, 0]] + [filled[:, j, 1:] for j in range(1, 4)], dim=1)


@torch.no_grad()
def generate(pred, interp, batch: dict, steps: int | None, seed: int, guidance_scale: float | None,
             context_guidance: float | None) -> torch.Tensor:
    """17 scaled latents per window: `predict_keys` then `fill_keys`. Returns (b, 17, c, h, w)."""
    keys = predict_keys(pred, batch, steps, seed, guidance_scale, context_guidance)
    return fill_keys(interp, batch, keys, steps, seed + 1, guidance_scale, context_guidance)


@torch.no_grad()
def generate_windows(variants: dict[str, tuple], ae, val, indices: list[int], seeds: list[int], batch_size: int,
                     steps: int | None, guidance_scale: float | None, context_guidance: float | None,
                     log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """The first 16 decoded frames of every window for every variant and seed, and the autoencoder's reconstruction
    of the real latents.

    Args:
        variants: row name -> (prediction model, interpolation model, alpha_one); alpha_one runs `generate` with
            `force_alpha_one` on both models (every generated frame is then the image model's).
        val, indices: the `val_windows` dataset and window indices, taken `batch_size` at a time.
        seeds: sampling seeds; the batch starting at window s samples with seed + s for every variant, so the rows
            of one seed start from the same noise.
    Returns:
        {"recon": (n, 16, h, w, 3) uint8, f"{name}/{seed}": (n, 16, h, w, 3) uint8 for every variant and seed}.
    """
    from drivesim.nn.temporal import force_alpha_one

    t0 = time.time()
    gen: dict[str, list[np.ndarray]] = {"recon": []}
    for seed in seeds:
        for name in variants:
            gen[f"{name}/{seed}"] = []
    for s in range(0, len(indices), batch_size):
        items = [val[i] for i in indices[s:s + batch_size]]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if isinstance(items[0][k], torch.Tensor)}
        for seed in seeds:
            for name, (pred, interp, alpha_one) in variants.items():
                with contextlib.ExitStack() as stack:
                    if alpha_one:
                        stack.enter_context(force_alpha_one(pred))
                        stack.enter_context(force_alpha_one(interp))
                    z = generate(pred, interp, batch, steps, seed + s, guidance_scale, context_guidance)
                gen[f"{name}/{seed}"].append(_to_uint8(ae.decode_scaled(z[:, :16])))
        gen["recon"].append(_to_uint8(ae.decode_scaled(batch["latents"][:, :16].float())))
        log(f"windows {min(s + batch_size, len(indices))}/{len(indices)}  {time.time() - t0:.0f}s")
    return {k: np.concatenate(v) for k, v in gen.items()}


def seed_metrics(feats: dict[str, np.ndarray], gen: dict[str, np.ndarray], names, seed: int) -> dict:
    """FVD_16 against the real windows and against their reconstructions, and flicker, of each row's windows of one
    seed: {"fvd": {name: x}, "fvd_vs_recon": {name: x}, "flicker": {name: {"diff1", "diff2"}}}. `feats`: I3D
    embeddings of "real", "recon" and every f"{name}/{seed}"; empty (no I3D pass): every FVD is None."""
    from drivesim.eval.metrics import fvd

    return {
        "fvd": {n: fvd(feats["real"], feats[f"{n}/{seed}"]) if feats else None for n in names},
        # against the autoencoder's reconstructions of the real windows: the decoder's own blur is on both
        # sides, so what is left is what the diffusion models add (a weak decoder puts a floor under FVD)
        "fvd_vs_recon": {n: fvd(feats["recon"], feats[f"{n}/{seed}"]) if feats else None for n in names},
        "flicker": {n: flicker_measures(gen[f"{n}/{seed}"]) for n in names},
    }


def spread(values) -> dict[str, float] | None:
    """mean, sample std over seeds (0 for one seed), min and max of per-seed values; None if any value is None."""
    if any(v is None for v in values):
        return None
    values = np.array(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max())}


def summarize(per_seed: list[dict], names) -> dict[str, dict | None]:
    """f"{metric}/{name}" -> `spread` over seeds of the `seed_metrics` dicts, metric in fvd, fvd_vs_recon, diff1,
    diff2."""
    return {
        f"{metric}/{n}": spread([r[metric][n] for r in per_seed]) for metric in ("fvd", "fvd_vs_recon") for n in names
    } | {
        f"{d}/{n}": spread([r["flicker"][n][d] for r in per_seed]) for d in ("diff1", "diff2") for n in names
    }


def alpha_stats(model: torch.nn.Module) -> dict[str, float]:
    """min, max and mean of the model's alpha blend factors (each rounded to 3 decimals)."""
    from drivesim.nn.temporal import AlphaBlender

    v = sorted(round(float(m.alpha().detach()), 3) for m in model.modules() if isinstance(m, AlphaBlender))
    return {"min": v[0], "max": v[-1], "mean": float(np.mean(v))}


def table(summary: dict, names, fvd_recon: float | None, flicker_real: dict, flicker_recon: dict) -> str:
    """The markdown table: real and reconstructed windows, then one row per name (mean +- std over seeds)."""

    def cell(v: dict | None, fmt: str) -> str:
        return "-" if v is None else f"{v['mean']:{fmt}} +- {v['std']:{fmt}}"

    lines = ["| clips | FVD_16 vs real | FVD_16 vs recon | diff1 | diff2 |", "|---|---|---|---|---|",
             f"| real | 0 | - | {flicker_real['diff1']:.4f} | {flicker_real['diff2']:.4f} |",
             f"| recon | {'-' if fvd_recon is None else format(fvd_recon, '.1f')} | 0 | {flicker_recon['diff1']:.4f} | "
             f"{flicker_recon['diff2']:.4f} |"]
    for n in names:
        cells = [cell(summary[f"{m}/{n}"], ".1f") for m in ("fvd", "fvd_vs_recon")]
        cells += [cell(summary[f"{d}/{n}"], ".4f") for d in ("diff1", "diff2")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The dataset / cache / checkpoint options shared with `keyframe_samplers.py`."""
    ap.add_argument("--data", type=Path, required=True, help="clip-format dataset (its val clips are the real set)")
    ap.add_argument("--cache", type=Path, required=True, help="latent cache of the same dataset (val split)")
    ap.add_argument("--ae", type=Path, required=True, help="exported (video) autoencoder")
    ap.add_argument("--prediction", type=Path, required=True)
    ap.add_argument("--interpolation", type=Path, required=True)
    ap.add_argument("--max-clips", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)


def val_windows(cache: Path, data: Path, max_clips: int | None):
    """The evaluation set: the first and the last 17-frame latent window of every val clip, and the real clips.

    Returns:
        (val dataset, its window indices, (h, w) of decoded frames, clip id -> (n, 16, h, w, 3) uint8 real windows).
    """
    from drivesim.datasets.latent_cache import LatentClipDataset

    val = LatentClipDataset(cache, split="val", num_frames=17, frame_stride=1)
    picks: dict[str, list[tuple[int, int]]] = {}
    for i, (clip, start) in enumerate(val.windows):
        picks.setdefault(val.clip_ids[clip], []).append((start, i))
    indices = [i for cid in sorted(picks)[:max_clips] for i in sorted({min(picks[cid])[1], max(picks[cid])[1]})]
    first = val[indices[0]]
    size = (first["latents"].shape[-2] * 8, first["latents"].shape[-1] * 8)
    return val, indices, size, _real_windows(data, size, 16, max_clips)


def main(argv: list[str] | None = None) -> dict:
    from drivesim.eval.features import i3d_embeddings
    from drivesim.eval.metrics import fvd
    from drivesim.eval.results import write_json

    import drivesim

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the models' config)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="labels/boxes CFG scale")
    ap.add_argument("--context-guidance", type=float, default=None, help="context guidance s (LVDM 1 + w)")
    ap.add_argument("--train-minutes", default=None, help="free text recorded in the report (training budgets)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="sampling seeds (seed, seed + 1000, ...): every row is generated once per seed and "
                         "reported as mean +- std over seeds")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here (benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds: {args.seeds} must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    ae = drivesim.load(args.ae)
    pred = drivesim.load(args.prediction)
    interp = drivesim.load(args.interpolation)
    val, indices, size, real_by_clip = val_windows(args.cache, args.data, args.max_clips)
    real = np.concatenate(list(real_by_clip.values()))

    seeds = [args.seed + 1000 * k for k in range(args.seeds)]
    names = ("video", "alpha1")
    t0 = time.time()
    gen = generate_windows({"video": (pred, interp, False), "alpha1": (pred, interp, True)}, ae, val, indices, seeds,
                           args.batch, args.steps, args.guidance_scale, args.context_guidance,
                           log=lambda line: print(line, flush=True))
    gen_s = time.time() - t0

    feats = {"real": i3d_embeddings(real)}
    feats.update({k: i3d_embeddings(v) for k, v in gen.items()})
    per_seed = {seed: seed_metrics(feats, gen, names, seed) for seed in seeds}

    report = {
        "protocol": "first and last 17-frame latent window of every val clip; key frames by the prediction model "
                    "from 1 real context latent (stride 4), filled x4 by the interpolation model; first 16 frames "
                    "decoded; the same with every alpha = 1; FVD_16 (I3D) against the real windows and against "
                    "their reconstructions; one trained model pair, sampling seeds vary",
        "models": {"ae": str(args.ae), "prediction": str(args.prediction), "interpolation": str(args.interpolation)},
        "real_clips": int(len(real)), "generated_clips": int(len(indices)), "frames": 16,
        "resolution": list(size), "steps": args.steps, "seeds": seeds, "generation_s": round(gen_s, 1),
        "train_minutes": args.train_minutes,
        "fvd_recon": fvd(feats["real"], feats["recon"]),
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "summary": summarize(list(per_seed.values()), names) | {
            # paired per seed: the same noise for both variants, so the difference has less spread than either
            "fvd_vs_recon_gain": spread([r["fvd_vs_recon"]["alpha1"] - r["fvd_vs_recon"]["video"]
                                         for r in per_seed.values()]),
        },
        "flicker_real": flicker_measures(real), "flicker_recon": flicker_measures(gen["recon"]),
        "alphas": {"prediction": alpha_stats(pred), "interpolation": alpha_stats(interp)},
    }
    b0 = val[indices[0]]
    boxes, box_mask = b0["boxes"][:16].numpy(), b0["box_mask"][:16].numpy()
    _filmstrip(real_by_clip[b0["clip_id"]][0], boxes, box_mask, args.out / "filmstrip_real.png")
    for k in ("video", "alpha1"):
        _filmstrip(gen[f"{k}/{seeds[0]}"][0], boxes, box_mask, args.out / f"filmstrip_{k}.png")
    _filmstrip(gen["recon"][0], boxes, box_mask, args.out / "filmstrip_recon.png")
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)
    np.savez_compressed(args.out / "i3d_features.npz", **{k.replace("/", "_"): v for k, v in feats.items()})
    print(f"{len(seeds)} seed(s), mean +- std (sample std over seeds)")
    print(table(report["summary"], names, report["fvd_recon"], report["flicker_real"], report["flicker_recon"]))
    print(json.dumps({k: report[k] for k in ("real_clips", "generated_clips", "generation_s", "alphas")}))
    return report


if __name__ == "__main__":
    main()
