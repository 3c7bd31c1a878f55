"""Which latent space: KL-f8 (+ the video decoder) vs LVDM's 3D autoencoder (issue 21), on the val clips.

Two latent spaces of the same clips (`(b, t, 3, H, W)` in [-1, 1]):
- KL-f8 (`--kl-ae`): one latent frame per video frame, (b, t, 4, H/8, W/8); the exported video autoencoder
  (image encoder + video-fine-tuned decoder, a demo stack's `autoencoder` folder) or a plain image autoencoder;
- 3D (`--ae3d`, `video_autoencoder_3d`): one latent frame per 4 video frames, (b, t/4, 4, H/8, W/8).

Reconstruction, per val clip (its first floor(T / 4) * 4 frames, the frames `drivesim encode` caches for the 3D
space, so both spaces see the same frames): encode the whole clip (posterior mean, what the latent cache stores),
decode it as in use (`decode`, chunked and cross-faded), then
- PSNR, SSIM per frame and flicker mean |(rec[t+1] - rec[t]) - (x[t+1] - x[t])| on [0, 1] pixels
  (`drivesim.autoencoder.metrics`, the functions and protocol of `benchmarks/ae_recon.py`);
- FVD_16 of the reconstructions vs the real clips on non-overlapping 16-frame windows (the project's I3D,
  `drivesim eval weights --name i3d`; skipped with the reason when the weights are absent or < 2 windows);
- encode and decode seconds per second of video, timed on `--threads` (default 1) torch threads, the two spaces
  alternating which goes first from clip to clip so a noisy neighbour slows both alike;
- latent numbers per second of video: channels * h * w * latent frames of the actual latents / clip seconds, and
  the ratio 3D / KL-f8 (1/4 at equal channels and resolution: what the diffusion model has to generate).

Rollouts (with `--stack-kl` / `--stack-3d`, `drivesim rollout` checkpoint folders; the 3D one is
D/{autoencoder, prediction}): per val clip one rollout of `--rollout-frames` frames from the clip's scenario
(its boxes and labels, looped past its end) through `drivesim.pipeline.rollout.rollout_scenario`, the function
behind `drivesim rollout` (same seed per clip for both stacks; `--rollout-set key=value` for both, e.g. the demo's
`steps=4 context_guidance=1.0`), then frames/s of generation (wall clock of the whole rollout: sampling, decode,
segment mp4s) and FVD_16 of the rollout videos (read back from the mp4, as the demo evaluates them) vs the real
val windows, and vs that space's reconstructions of them (the decoder's floor on both sides). Each stack member's
training steps and run history are read from its folders where they are there (a demo's `demo_state.json`, a
run's `history.jsonl` and latest checkpoint).

    python benchmarks/latent_spaces.py --data data/sample --kl-ae runs/demo/stack/autoencoder \\
        --ae3d runs/ae3d/model-ema --stack-kl runs/demo/stack --stack-3d runs/stack3d --out runs/latent_spaces \\
        --rollout-set steps=4 --rollout-set context_guidance=1.0

Writes OUT/report.json (also `--json PATH`), OUT/rollouts/<space>/<clip>/ and prints a markdown table. The report
records the command, the sha256 of every checkpoint, `--train-command` texts and the machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, not the repo root
from _common import fvd_available, machine  # noqa: E402
from ae_recon import _load_val_clips, _windows16  # noqa: E402

SPACES = ("kl-f8", "3d")


def weights_sha256(folder: Path) -> str:
    """sha256 of the model.safetensors an exported model folder (or a run folder's latest checkpoint) loads."""
    from drivesim.eval.weights import sha256_file

    from drivesim.rollout.stack import checkpoint_folder

    return sha256_file(checkpoint_folder(folder) / "model.safetensors")


def latent_numbers_per_second(latent_shapes: list[tuple[int, ...]], video_frames: int, fps: float) -> float:
    """Numbers a model must generate per second of video: sum over clips of prod(latent (t', c, h, w)) over the
    seconds those clips last (video_frames / fps)."""
    return float(sum(np.prod(s) for s in latent_shapes)) / (video_frames / fps)


def training_record(member: Path) -> dict:
    """What a stack member's folders say about its training (all optional): the run's history.jsonl events (start
    and resume times, train config limits), the latest checkpoint's step, and the stage seconds of a demo's
    demo_state.json two folders above the run."""
    from drivesim.training.checkpoint import latest_checkpoint

    real = Path(member).resolve()
    run = real if (real / "checkpoints").is_dir() else real.parent
    out: dict = {"folder": str(real)}
    hist = run / "history.jsonl"
    if hist.is_file():
        events = [json.loads(line) for line in hist.read_text().splitlines() if line.strip()]
        out["history"] = [{k: e.get(k) for k in ("event", "step", "time", "checkpoint")}
                          | {k: e.get("train_config", {}).get(k) for k in ("max_steps", "max_minutes", "batch_size")}
                          for e in events]
    ckpt = latest_checkpoint(run / "checkpoints") if (run / "checkpoints").is_dir() else None
    if ckpt is not None and (ckpt / "trainer_state.json").is_file():
        out["steps"] = json.loads((ckpt / "trainer_state.json").read_text()).get("step")
    state = run.parent.parent / "demo_state.json"  # OUT/train/<stage>/model -> OUT/demo_state.json
    if state.is_file():
        stages = json.loads(state.read_text()).get("stages", {})
        if run.name in stages:  # a shipped model's stage is a copy: its info says so ("weights": "pretrained")
            out["demo_stage_seconds"] = stages[run.name].get("seconds")
            info = stages[run.name].get("info") or {}
            out["demo_stage_info"] = {k: info[k] for k in ("weights", "pretrained", "steps", "stop_reason",
                                                           "steps_per_s", "torch_threads") if k in info}
    card = real / "model_card.json"
    if card.is_file():
        c = json.loads(card.read_text())
        out["card"] = {k: c.get(k) for k in ("command", "steps", "total_steps") if k in c}
    return out


def reconstruct(models: dict, data: Path, size, max_clips: int | None):
    """Encode + decode every val clip in both spaces. Returns (per-space rows, real windows, fps, clips, frames)."""
    from drivesim.datasets.clips import read_annotation, read_manifest

    from drivesim.autoencoder.metrics import flicker, psnr, ssim

    entries = [e for e in read_manifest(data).clips if e.split == "val"][:max_clips]
    fps = read_annotation(entries[0].annotation).fps if entries else 0.0
    per = {s: {"psnr": [], "ssim": [], "flicker": [], "encode_s": 0.0, "decode_s": 0.0, "windows": [],
               "latent_shapes": []} for s in models}
    real_windows: list[np.ndarray] = []
    frames = clips = 0
    with torch.no_grad():
        for k, (_, x) in enumerate(_load_val_clips(data, size, max_clips, None)):
            t = x.shape[1] // 4 * 4
            if t < 4:
                continue
            x = x[:, :t]
            if k == 0:  # first-call allocation costs stay out of the timings
                for ae in models.values():
                    ae.decode(ae.encode(x[:, :4]).latents(False))
            ref = (x + 1) / 2
            order = list(models) if k % 2 == 0 else list(reversed(models))
            for s in order:
                ae, row = models[s], per[s]
                t0 = time.perf_counter()
                z = ae.encode(x).latents(False)
                t1 = time.perf_counter()
                rec = ae.decode(z)
                row["decode_s"] += time.perf_counter() - t1
                row["encode_s"] += t1 - t0
                row["latent_shapes"].append(tuple(z.shape[1:]))
                rec = ((rec.clamp(-1, 1) + 1) / 2).double()
                row["psnr"].append(psnr(rec, ref)[0])
                row["ssim"].append(ssim(rec, ref)[0])
                row["flicker"].append(flicker(rec, ref)[0])
                row["windows"] += _windows16(rec[0])
            real_windows += _windows16(ref[0].double())
            frames += t
            clips += 1
    return per, real_windows, fps, clips, frames


def rollouts(name: str, ckpt_dir: Path, data: Path, max_clips: int | None, num_frames: int, sets: list[str],
             size, seed: int, out: Path) -> dict:
    """One `rollout_scenario` per val clip (its scenario) with the stack `ckpt_dir`; frames/s and the videos."""
    import dataclasses

    from drivesim.datasets.clips import read_annotation, read_manifest, read_video
    from drivesim.datasets.scenario import Scenario, save_scenario

    from drivesim.pipeline.rollout import resolve_config, rollout_scenario
    from drivesim.rollout import checkpoint_sha256s, load_models, resolve_fps

    entries = [e for e in read_manifest(data).clips if e.split == "val"][:max_clips]
    cfg = resolve_config(None, sets, False)
    if size is not None:
        cfg = dataclasses.replace(cfg, resolution=tuple(size))
    windows: list[np.ndarray] = []
    seconds: list[float] = []
    runner_s: list[float] = []
    with torch.no_grad():
        models = load_models(ckpt_dir)
        cfg = resolve_fps(cfg, models)
        for i, e in enumerate(entries):
            scen = out / "scenarios" / f"{e.clip_id}.json"
            scen.parent.mkdir(parents=True, exist_ok=True)
            save_scenario(Scenario.from_clip(read_annotation(e.annotation)), scen)
            t0 = time.perf_counter()
            summary = rollout_scenario(scen, models, cfg, out / name / e.clip_id, seed + i, num_frames, False,
                                       ckpt_dir, progress=False)
            seconds.append(time.perf_counter() - t0)
            runner_s.append(summary["seconds"])
            video = read_video(summary["video"])  # (T, h, w, 3) uint8
            windows += [video[s:s + 16] for s in range(0, video.shape[0] - 15, 16)]
    members = {m: training_record(ckpt_dir / m) for m in ("autoencoder", "image_ldm", "prediction",
                                                          "interpolation") if (ckpt_dir / m).exists()}
    return {"stack": str(ckpt_dir), "sha256": checkpoint_sha256s(ckpt_dir), "fps": cfg.fps,
            "frames_per_latent": models.frames_per_latent, "rollouts": len(seconds), "frames": num_frames,
            "seconds": seconds, "runner_seconds": runner_s,
            "frames_per_s": len(seconds) * num_frames / sum(seconds) if seconds else None,
            "config": dataclasses.asdict(cfg), "training": members,
            "_windows": windows}


def main(argv: list[str] | None = None) -> dict:
    import drivesim
    from drivesim.autoencoder import AutoencoderKL, VideoAutoencoder, VideoAutoencoder3D

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="clip-format dataset; its val clips are measured")
    ap.add_argument("--kl-ae", type=Path, required=True,
                    help="KL-f8 video autoencoder export (a demo stack's autoencoder) or an image autoencoder")
    ap.add_argument("--ae3d", type=Path, required=True, help="trained 3D autoencoder export (video_autoencoder_3d)")
    ap.add_argument("--stack-kl", type=Path, default=None, help="rollout checkpoint dir on KL-f8 latents")
    ap.add_argument("--stack-3d", type=Path, default=None, help="rollout checkpoint dir D/{autoencoder,prediction}")
    ap.add_argument("--rollout-frames", type=int, default=64, help="frames per rollout (one per val clip)")
    ap.add_argument("--rollout-set", action="append", default=[], metavar="KEY=VALUE",
                    help="rollout config override for both stacks, repeatable (e.g. steps=4)")
    ap.add_argument("--size", default=None, help="HxW frames are resized to (default: the clips' own size)")
    ap.add_argument("--max-clips", type=int, default=None, help="val clips (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="rollout seed of the first clip (clip i: seed + i)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every timed part (0: torch's default)")
    ap.add_argument("--no-fvd", action="store_true", help="skip FVD (no I3D pass)")
    ap.add_argument("--train-command", action="append", default=[], metavar="NAME=COMMAND",
                    help="how a model was trained, recorded in the report, repeatable")
    ap.add_argument("--out", type=Path, required=True, help="report.json and the rollouts go here")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here (benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.rollout_frames < 16:
        ap.error(f"--rollout-frames: {args.rollout_frames}: FVD_16 needs >= 16")
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    kl, ae3d = drivesim.load(args.kl_ae), drivesim.load(args.ae3d)
    if not isinstance(kl, AutoencoderKL) or getattr(kl, "frames_per_latent", 1) != 1:
        ap.error(f"--kl-ae: {args.kl_ae} holds {type(kl).__name__}, not a KL-f8 (video) autoencoder")
    if not isinstance(ae3d, VideoAutoencoder3D):
        ap.error(f"--ae3d: {args.ae3d} holds {type(ae3d).__name__}, not a video_autoencoder_3d")
    models = {"kl-f8": kl.eval(), "3d": ae3d.eval()}
    labels = {"kl-f8": "KL-f8 + video decoder" if isinstance(kl, VideoAutoencoder) else "KL-f8 (image decoder)",
              "3d": "3D autoencoder (LVDM)"}

    t_start = time.time()
    per, real_windows, fps, clips, frames = reconstruct(models, args.data, size, args.max_clips)
    if not clips:
        ap.error(f"--data: {args.data} has no val clip of >= 4 frames")
    video_s = frames / fps
    fvd_skipped = "--no-fvd" if args.no_fvd else fvd_available(len(real_windows))

    stacks = {s: p for s, p in (("kl-f8", args.stack_kl), ("3d", args.stack_3d)) if p is not None}
    rolled = {s: rollouts(s, p, args.data, args.max_clips, args.rollout_frames, args.rollout_set, size, args.seed,
                          args.out / "rollouts") for s, p in stacks.items()}

    feats: dict[str, np.ndarray] = {}
    if fvd_skipped is None:
        from drivesim.eval.features import i3d_embeddings
        from drivesim.eval.metrics import fvd

        feats["real"] = i3d_embeddings(np.stack(real_windows))
        for s in models:
            feats[f"recon/{s}"] = i3d_embeddings(np.stack(per[s]["windows"]))
        for s, r in rolled.items():
            if len(r["_windows"]) >= 2:
                feats[f"rollout/{s}"] = i3d_embeddings(np.stack(r["_windows"]))
        np.savez_compressed(args.out / "i3d_features.npz", **{k.replace("/", "_"): v for k, v in feats.items()})

    rows: dict[str, dict] = {}
    for s in models:
        p, q, f = (torch.cat(per[s][m]) for m in ("psnr", "ssim", "flicker"))
        shape = per[s]["latent_shapes"][0]
        rows[s] = {
            "label": labels[s], "checkpoint": str(getattr(args, "kl_ae" if s == "kl-f8" else "ae3d")),
            "model_class": models[s].model_class_name, "frames_per_latent": models[s].frames_per_latent,
            "latent_shape_first_clip": list(shape), "latent_channels": int(shape[1]),
            "latent_numbers_per_video_s": latent_numbers_per_second(per[s]["latent_shapes"], frames, fps),
            "psnr_db": p.mean().item(), "psnr_std": p.std().item(), "ssim": q.mean().item(),
            "ssim_std": q.std().item(), "flicker": f.mean().item(),
            "flicker_per_clip": [c.mean().item() for c in per[s]["flicker"]],
            "encode_s_per_video_s": per[s]["encode_s"] / video_s, "decode_s_per_video_s": per[s]["decode_s"] / video_s,
            "fvd16_recon": (fvd(feats["real"], feats[f"recon/{s}"]) if feats else None),
        }
        if s in rolled:
            r = rolled[s]
            rows[s]["rollout"] = {k: v for k, v in r.items() if k != "_windows"} | {
                "windows": len(r["_windows"]),
                "fvd16": fvd(feats["real"], feats[f"rollout/{s}"]) if f"rollout/{s}" in feats else None,
                # against this space's own reconstructions of the real windows: the decoder's floor on both sides
                "fvd16_vs_recon": fvd(feats[f"recon/{s}"], feats[f"rollout/{s}"]) if f"rollout/{s}" in feats else None}
    ratio = rows["3d"]["latent_numbers_per_video_s"] / rows["kl-f8"]["latent_numbers_per_video_s"]
    report = {
        "benchmark": "latent_spaces",
        "protocol": "val clips, first floor(T/4)*4 frames each; whole-clip encode (posterior mean) + chunked decode "
                    "per space, timed alternately on one process; PSNR/SSIM per frame, flicker per frame pair "
                    "(drivesim.autoencoder.metrics); FVD_16 (I3D) on non-overlapping 16-frame windows vs the real "
                    "windows; rollouts: drivesim.pipeline.rollout.rollout_scenario of each val clip's scenario, "
                    "same seed per clip for both stacks (scenario looped past the clip's end), videos read back "
                    "from mp4, FVD_16 vs the real windows and vs the space's reconstructions of them",
        "command": "python benchmarks/latent_spaces.py " + shlex.join(argv),
        "train_commands": dict(c.partition("=")[::2] for c in args.train_command),
        "data": str(args.data), "clips": clips, "frames": frames, "fps": fps, "video_seconds": video_s,
        "resolution": list(real_windows[0].shape[1:3]) if real_windows else None,
        "real_windows": len(real_windows), "fvd_skipped": fvd_skipped,
        "sha256": {"kl_ae": weights_sha256(args.kl_ae), "ae3d": weights_sha256(args.ae3d)},
        "training": {"kl-f8": training_record(args.kl_ae), "3d": training_record(args.ae3d)},
        "latent_numbers_ratio_3d_over_kl": ratio,
        "rows": rows, "rollout_frames": args.rollout_frames if stacks else None, "rollout_sets": args.rollout_set,
        "total_s": round(time.time() - t_start, 1), "machine": machine(),
    }
    notes = [f"--stack-{s}'s autoencoder is not --{a} (other weights): its rollout and reconstruction rows measure "
             "different autoencoders" for s, a, k in (("kl", "kl-ae", "kl-f8"), ("3d", "ae3d", "3d"))
             if k in rolled and rolled[k]["sha256"].get("autoencoder") != report["sha256"][a.replace("-", "_")]]
    if notes:
        report["notes"] = notes
        print("NOTE: " + "; ".join(notes))
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"val: {clips} clips, {frames} frames ({video_s:.1f} s of video at {fps:g} fps), "
          f"{len(real_windows)} real 16-frame windows; {torch.get_num_threads()} torch thread(s)"
          + (f"; FVD skipped: {fvd_skipped}" if fvd_skipped else ""))
    print("| latent space | latent (t', c, h, w) | numbers / video s | PSNR dB | SSIM | flicker (x1e-3) | "
          "rec. FVD_16 | encode s / video s | decode s / video s | rollout frames/s | rollout FVD_16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        ro = r.get("rollout", {})
        print(f"| {r['label']} | {tuple(r['latent_shape_first_clip'])} | {r['latent_numbers_per_video_s']:.0f} | "
              f"{r['psnr_db']:.2f} ± {r['psnr_std']:.2f} | {r['ssim']:.4f} | {1e3 * r['flicker']:.3f} | "
              f"{num(r['fvd16_recon'], '.1f')} | {r['encode_s_per_video_s']:.3f} | {r['decode_s_per_video_s']:.3f} | "
              f"{num(ro.get('frames_per_s'), '.2f')} | {num(ro.get('fvd16'), '.1f')} |")
    print(f"latent numbers per second of video, 3D / KL-f8: {ratio:.3f}")
    return report


if __name__ == "__main__":
    main()
