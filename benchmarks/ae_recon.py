"""Reconstruction quality of the image decoder vs the video-fine-tuned decoder.

For every val clip of a clip-format dataset: encode all frames with the (shared, frozen) encoder (posterior
mean, what `drivesim encode` caches and the diffusion models learn; `--latents sample`: one seeded posterior
draw per frame, the same draw for every decoder), decode once with the image autoencoder's decoder and once with
the video autoencoder's decoder (chunked, cross-faded, as in use), then report per-frame PSNR and SSIM and the
temporal flicker mean |(rec[t+1] - rec[t]) - (x[t+1] - x[t])| (on [0, 1] pixels) as one markdown table.

    python benchmarks/ae_recon.py --data data/sample --image-ae runs/ae/model --video-ae runs/vdec/model \
        --image-minutes 11 --video-minutes 7

Also reports the video decoder with every alpha forced to 1 (must equal the image decoder: a sanity row) and
the learned alphas.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange


def _load_val_clips(data: Path, size: tuple[int, int] | None, max_clips: int | None, max_frames: int | None):
    from drivesim.datasets.clips import load_clip, read_manifest
    from drivesim.datasets.transforms import frames_to_tensor, resize_frames

    entries = [e for e in read_manifest(data).clips if e.split == "val"]
    if max_clips:
        entries = entries[:max_clips]
    for e in entries:
        frames, _ = load_clip(e)
        if size is not None and frames.shape[1:3] != size:
            frames = resize_frames(frames, size)
        if max_frames:
            frames = frames[:max_frames]
        yield e.clip_id, frames_to_tensor(frames)[None]  # (1, t, 3, h, w) in [-1, 1]


def _windows16(video: torch.Tensor) -> list[np.ndarray]:
    """(t, 3, h, w) in [0, 1] -> non-overlapping 16-frame windows as (16, h, w, 3) uint8 for I3D."""
    u8 = (video.clamp(0, 1) * 255).round().to(torch.uint8)
    return [rearrange(u8[s:s + 16], "t c h w -> t h w c").numpy() for s in range(0, u8.shape[0] - 15, 16)]


def main(argv: list[str] | None = None) -> dict:
    import drivesim
    from drivesim.autoencoder import AutoencoderKL, VideoAutoencoder
    from drivesim.autoencoder.metrics import flicker, psnr, ssim
    from drivesim.nn.temporal import AlphaBlender, force_alpha_one

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--image-ae", type=Path, required=True, help="exported image autoencoder (or its run folder)")
    ap.add_argument("--video-ae", type=Path, required=True, help="exported video autoencoder (or its run folder)")
    ap.add_argument("--size", default="128x256", help="HxW frames are resized to (the preset's resolution)")
    ap.add_argument("--max-clips", type=int, default=None)
    ap.add_argument("--max-frames", type=int, default=None, help="frames per clip (default: all)")
    ap.add_argument("--image-minutes", type=float, default=None, help="training time of the image AE (report)")
    ap.add_argument("--video-minutes", type=float, default=None, help="training time of the video decoder")
    ap.add_argument("--latents", choices=("mean", "sample"), default="mean",
                    help="decode the posterior mean (default) or one seeded posterior sample per frame")
    ap.add_argument("--seed", type=int, default=0, help="seed of the posterior samples (--latents sample)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--fvd", action="store_true", help="also reconstruction FVD on non-overlapping 16-frame "
                    "windows (I3D weights from `drivesim eval weights`; few windows: compare rows, not papers)")
    args = ap.parse_args(argv)
    h, w = (int(v) for v in args.size.split("x"))

    image_ae = drivesim.load(args.image_ae)
    video_ae = drivesim.load(args.video_ae)
    assert isinstance(image_ae, AutoencoderKL) and isinstance(video_ae, VideoAutoencoder)
    video_ae.attach_to(image_ae, source=str(args.video_ae))  # same encoder: same latents for both decoders
    alphas = [round(float(m.alpha().detach()), 4) for m in video_ae.modules() if isinstance(m, AlphaBlender)]

    rows = {"image decoder": [], "video decoder": [], "video decoder, alpha forced to 1": []}
    windows: dict[str, list] = {"original": [], **{k: [] for k in rows}}
    seconds = {k: 0.0 for k in rows}
    n_frames = 0
    with torch.no_grad():
        warm = torch.zeros(1, 2, image_ae.config.latent_channels, h // 8, w // 8)
        image_ae.decode(warm), video_ae.decode(warm)  # first-call allocation costs stay out of the timings
        for _, x in _load_val_clips(args.data, (h, w), args.max_clips, args.max_frames):
            seeded = torch.Generator().manual_seed(args.seed + n_frames)  # only drawn from with --latents sample
            z = image_ae.encode(x).latents(args.latents == "sample", seeded)
            ref = (x + 1) / 2
            for name in rows:
                t0 = time.perf_counter()
                if name == "image decoder":
                    rec = image_ae.decode(z)
                elif name == "video decoder":
                    rec = video_ae.decode(z)
                else:
                    with force_alpha_one(video_ae):
                        rec = video_ae.decode(z)
                seconds[name] += time.perf_counter() - t0
                rec = ((rec.clamp(-1, 1) + 1) / 2).double()
                rows[name].append((psnr(rec, ref)[0], ssim(rec, ref)[0], flicker(rec, ref)[0]))
                if args.fvd:
                    windows[name] += _windows16(rec[0])
            if args.fvd:
                windows["original"] += _windows16(ref[0].double())
            n_frames += x.shape[1]

    result = {"frames": n_frames, "clips": len(rows["image decoder"]), "latents": args.latents, "alphas": alphas,
              "rows": {}}
    for name, per_clip in rows.items():
        p = torch.cat([r[0] for r in per_clip])
        s = torch.cat([r[1] for r in per_clip])
        f = torch.cat([r[2] for r in per_clip])
        result["rows"][name] = {"psnr_db": p.mean().item(), "psnr_std": p.std().item(), "ssim": s.mean().item(),
                                "ssim_std": s.std().item(), "flicker": f.mean().item(),
                                "flicker_per_clip": [r[2].mean().item() for r in per_clip],
                                "decode_s_per_frame": seconds[name] / n_frames}
    image_clips, video_clips = (result["rows"][k]["flicker_per_clip"] for k in ("image decoder", "video decoder"))
    result["video_flickers_less_clips"] = sum(v < i for v, i in zip(video_clips, image_clips, strict=True))
    if args.fvd:
        from drivesim.eval.features import i3d_embeddings
        from drivesim.eval.metrics import fvd

        feats = {k: i3d_embeddings(np.stack(v)) for k, v in windows.items()}
        for name in rows:
            result["rows"][name]["fvd"] = fvd(feats["original"], feats[name])
        result["fvd_windows"] = len(windows["original"])
    minutes = {"image decoder": args.image_minutes, "video decoder": args.video_minutes,
               "video decoder, alpha forced to 1": None}
    print(f"val: {result['clips']} clips, {n_frames} frames at {h}x{w}, posterior {args.latents} latents; video "
          f"decoder alphas {alphas}")
    fvd_head = f" rec. FVD ({result.get('fvd_windows')} x 16 frames) |" if args.fvd else ""
    print("| decoder | train time (min) | PSNR (dB) | SSIM | flicker (x1e-3) | decode s/frame |" + fvd_head)
    print("|---|---|---|---|---|---|" + ("---|" if args.fvd else ""))
    for name, r in result["rows"].items():
        m = minutes[name]
        print(f"| {name} | {'' if m is None else f'{m:.1f}'} | {r['psnr_db']:.2f} ± {r['psnr_std']:.2f} | "
              f"{r['ssim']:.4f} ± {r['ssim_std']:.4f} | {1e3 * r['flicker']:.3f} | {r['decode_s_per_frame']:.4f} |"
              + (f" {r['fvd']:.1f} |" if args.fvd else ""))
    print(f"the video decoder flickers less than the image decoder on {result['video_flickers_less_clips']} of "
          f"{result['clips']} clips")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
