"""Image LDM measurements: a day/night sample grid with boxes drawn, and a box-control check.

    python benchmarks/image_ldm_box_control.py --ldm runs/ldm --ae runs/ae/model --cache runs/latents.h5 \
        --out benchmarks/results/image_ldm [--data data/sample --fid]

Box-control check (needs no detector). For a latent z (c, h, w) the per-pixel energy is
e(p) = sum_c (z_c(p) - mean_p z_c)^2, i.e. how far a latent pixel is from the frame's average latent colour.
For a frame with conditioning boxes B, contrast = mean_{p in B} e(p) - mean_{p not in B} e(p) (latent pixels
whose centre lies in any box). Reported, over val frames, for:
- real: the cached latents of the val frames against their own boxes (what objects do to latents);
- generated, matched: samples conditioned on the frame's boxes and labels;
- generated, shuffled: the same noise and labels but the boxes of a frame of ANOTHER val clip, scored against the
  original frame's boxes (what a model that ignores the boxes' exact placement produces: layout priors such as objects
  sitting on the horizon);
- generated, no boxes: the box set dropped (learned null tokens), scored against the frame's boxes.
If the boxes control the samples, matched contrast should exceed shuffled and no-boxes contrast (paired
differences with their standard errors are printed) and move towards the real contrast. It does not say the
objects look right, only that the model puts something different from the background where the boxes are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from drivesim.datasets.latent_cache import LatentClipDataset
from drivesim.eval.box_fidelity import shuffled_partners
from einops import rearrange

from drivesim.models.image_ldm import ImageLDM
from drivesim.pipeline.sample import draw_boxes, frames_to_uint8, write_png
from drivesim.training.checkpoint import load_model
from drivesim.types import Conditioning


def box_masks(boxes: torch.Tensor, valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, k, 4) normalised xyxy + (n, k) bool -> (n, h, w) bool: latent pixels whose centre is in any box."""
    h, w = size
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    x1, y1, x2, y2 = (rearrange(boxes[..., i], "n k -> n k 1 1") for i in range(4))
    inside = (xs >= x1) & (xs < x2) & (rearrange(ys, "h -> h 1") >= y1) & (rearrange(ys, "h -> h 1") < y2)
    return (inside & rearrange(valid, "n k -> n k 1 1")).any(dim=1)


def energy(z: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) latents -> (n, h, w) e(p) = sum_c (z_c(p) - mean_p z_c)^2."""
    return (z - z.mean(dim=(-1, -2), keepdim=True)).square().sum(dim=1)


def contrast(z: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) mean energy inside minus outside the masks, and the same divided by the frame's mean energy."""
    e = energy(z.float())
    m = masks.float()
    inside = (e * m).sum((-1, -2)) / m.sum((-1, -2))
    outside = (e * (1 - m)).sum((-1, -2)) / (1 - m).sum((-1, -2))
    return inside - outside, (inside - outside) / e.mean((-1, -2))


def _summary(x: torch.Tensor) -> dict:
    x = x.double()
    return {"mean": float(x.mean()), "sem": float(x.std() / max(len(x), 1) ** 0.5), "n": len(x)}


def pick_frames(ds: LatentClipDataset, n: int, size: tuple[int, int]) -> list[int]:
    """Deterministic spread of val windows whose boxes cover some but not all latent pixels."""
    picked = []
    step = max(1, len(ds) // n)  # spread over every val clip (a step of len / 4n kept 48 frames in 3 clips)
    for i in range(0, len(ds), step):
        item = ds[i]
        m = box_masks(item["boxes"][0:1], item["box_mask"][0:1], size)
        if 0 < int(m.sum()) < m.numel():
            picked.append(i)
        if len(picked) == n:
            break
    return picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ldm", type=Path, required=True)
    ap.add_argument("--ae", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="clip-format dataset, for FID against val frames")
    ap.add_argument("--fid", action="store_true", help="FID of generated vs val frames (needs eval weights)")
    ap.add_argument("--n-control", type=int, default=48)
    ap.add_argument("--n-grid", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t_start = time.time()

    ldm: ImageLDM = load_model(args.ldm, "image_ldm", ema=args.ema)
    ae = load_model(args.ae)
    ds = LatentClipDataset(args.cache, split="val", num_frames=1)
    size = tuple(ds[0]["latents"].shape[-2:])
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"ldm": str(args.ldm), "ae": str(args.ae), "cache": str(args.cache), "steps": args.steps,
                     "sampler": args.sampler, "ema": args.ema, "latent_size": list(size)}

    idx = pick_frames(ds, args.n_control, size)
    items = [ds[i] for i in idx]
    real = torch.stack([it["latents"][0] for it in items])
    boxes = torch.stack([it["boxes"][0] for it in items])
    classes = torch.stack([it["classes"][0] for it in items])
    valid = torch.stack([it["box_mask"][0] for it in items])
    night = torch.stack([it["night"] for it in items])
    crowd = torch.stack([it["crowdedness"] for it in items])
    masks = box_masks(boxes, valid, size)
    n = len(items)
    results["frames"] = n
    results["box_cover_fraction"] = float(masks.float().mean())

    def cond_for(bx, cl, va, nt, drop_boxes=None):
        return Conditioning(boxes=rearrange(bx, "n k c -> n 1 k c"), classes=rearrange(cl, "n k -> n 1 k"),
                            box_mask=rearrange(va, "n k -> n 1 k"), night=nt, crowdedness=crowd,
                            drop_boxes=drop_boxes)

    # shuffled = the boxes of a frame of ANOTHER clip (a seeded derangement of clips); rolling by one frame among
    # neighbouring windows of the same clip gave nearly the matched boxes, a control that could not fail
    clip_ids = [it["clip_id"] for it in items]
    uniq = sorted(set(clip_ids))
    partner = shuffled_partners(len(uniq), args.seed)
    first_of = {c: clip_ids.index(c) for c in uniq}
    roll = torch.tensor([first_of[uniq[partner[uniq.index(c)]]] for c in clip_ids])
    conds = {
        "matched": cond_for(boxes, classes, valid, night),
        "shuffled": cond_for(boxes[roll], classes[roll], valid[roll], night),
        "no_boxes": cond_for(boxes, classes, valid, night, drop_boxes=torch.ones(n, dtype=torch.bool)),
    }
    c_real, r_real = contrast(real, masks)
    results["real"] = {"contrast": _summary(c_real), "relative_contrast": _summary(r_real)}
    generated = {}
    for s in args.guidance:
        block = {}
        for name, cond in conds.items():
            z = ldm.sample(cond, size, steps=args.steps, sampler=args.sampler, guidance_scale=s,
                           generator=torch.Generator().manual_seed(args.seed))[:, 0]
            generated[(s, name)] = z
            c, r = contrast(z, masks)
            block[name] = {"contrast": _summary(c), "relative_contrast": _summary(r), "_c": c}
        for other in ("shuffled", "no_boxes"):
            block[f"matched_minus_{other}"] = _summary(block["matched"]["_c"] - block[other]["_c"])
        for name in conds:
            block[name].pop("_c")
        results[f"guidance_{s:g}"] = block

    # grid: rows = val frames; columns = real (AE reconstruction), day x2, night x2; boxes drawn on all
    g = min(args.n_grid, n)
    rows = []
    s_grid = max(args.guidance)
    for r in range(g):
        sel = slice(r, r + 1)
        tiles = [frames_to_uint8(ae.decode_scaled(rearrange(real[sel], "n c h w -> n 1 c h w")))[0, 0]]
        for nt in (0, 1):
            cond = cond_for(boxes[sel].repeat(2, 1, 1), classes[sel].repeat(2, 1), valid[sel].repeat(2, 1),
                            torch.full((2,), nt))
            cond = cond.replace(crowdedness=crowd[sel].repeat(2))
            z = ldm.sample(cond, size, steps=args.steps, sampler=args.sampler, guidance_scale=s_grid,
                           generator=torch.Generator().manual_seed(args.seed + r))
            tiles += list(frames_to_uint8(ae.decode_scaled(z))[:, 0])
        b0 = boxes[r].numpy(), classes[r].numpy(), valid[r].numpy()
        tiles = [draw_boxes(t, *b0) for t in tiles]
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1))
    write_png(np.concatenate(rows, 0), args.out / "grid_day_night.png")
    results["grid"] = {"file": "grid_day_night.png", "columns": ["real (AE reconstruction)", "day", "day",
                                                                 "night", "night"], "guidance": s_grid}

    if args.fid:
        from drivesim.eval.features import inception_features
        from drivesim.eval.metrics import fid

        gen = frames_to_uint8(ae.decode_scaled(rearrange(generated[(s_grid, "matched")], "n c h w -> n 1 c h w")))
        if args.data is not None:
            from drivesim.datasets.torch_data import FrameDataset

            fds = FrameDataset(args.data, split="val")
            ref = np.stack([frames_to_uint8(fds[i]["frames"])[0] for i in range(0, len(fds), max(1, len(fds) // 512))])
            results["fid_reference"] = "val frames (pixels)"
        else:
            ref = frames_to_uint8(ae.decode_scaled(rearrange(real, "n c h w -> n 1 c h w")))[:, 0]
            results["fid_reference"] = "AE reconstructions of the same val frames"
        results["fid"] = {"value": fid(inception_features(ref), inception_features(gen[:, 0])),
                          "n_generated": len(gen), "n_reference": len(ref), "guidance": s_grid,
                          "note": "tiny n: FID is strongly biased upwards; compare only runs with equal n"}

    results["seconds"] = round(time.time() - t_start, 1)
    (args.out / "box_control.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
