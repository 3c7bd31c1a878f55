"""Key-frame sampling: DPM-Solver++ (2M) at 20 steps vs DDIM (eta = 0) at 50 steps: time and FVD_16.

Both are solvers of the same probability-flow ODE, started from the same x_T (same seed), so DPM-Solver++ at 20
steps should land close to DDIM at 50 at 2.5x fewer network calls. For each val window of 17 latent frames (first
and last window of every val clip of the latent cache, as in `video_ldm_temporal.py`):
1. key frames: the prediction model continues the window's first real latent frame (S = 1 context) to 5 key
   frames at stride 4, once per sampler setting (timed: this is the part being compared);
2. the interpolation model fills the gaps with ONE fixed setting (its config's sampler, `--fill-steps` steps) for
   every variant, so FVD differences come from the key frames only;
3. the autoencoder decodes the first 16 frames; FVD_16 against the val clips' own 16-frame windows.
Also reported: mean |keys(dpmpp 20) - keys(ddim 50)| over the scaled key latents, next to the mean |keys(ddim 50)|
(how far apart the two solvers land from the same noise).

    python benchmarks/keyframe_samplers.py --data data/sample --cache runs/demo/latents.h5 \\
        --ae runs/demo/stack/autoencoder --prediction runs/demo/stack/prediction \\
        --interpolation runs/demo/stack/interpolation

Writes benchmarks/results/keyframe_samplers.json (or --out) and prints a markdown table. Needs the I3D weights.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import machine, write_result
from video_ldm_temporal import _slice_cond, _to_uint8, add_model_args, fill_keys, val_windows

VARIANTS = (("ddim", 50), ("dpmpp", 20))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--fill-steps", type=int, default=10, help="DDIM steps of the (shared) interpolation fill")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="keyframe_samplers", help="result name under benchmarks/results/")
    args = ap.parse_args(argv)

    from drivesim.eval.features import i3d_embeddings
    from drivesim.eval.metrics import fvd

    import drivesim

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    ae, pred, interp = (drivesim.load(p) for p in (args.ae, args.prediction, args.interpolation))
    val, indices, size, real_by_clip = val_windows(args.cache, args.data, args.max_clips)
    real = np.concatenate(list(real_by_clip.values()))

    names = [f"{s}{n}" for s, n in VARIANTS]
    videos: dict[str, list[np.ndarray]] = {k: [] for k in names}
    keys: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    key_s = dict.fromkeys(names, 0.0)
    for s in range(0, len(indices), args.batch):
        items = [val[i] for i in indices[s:s + args.batch]]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if isinstance(items[0][k], torch.Tensor)}
        cond = _slice_cond(batch, [0, 4, 8, 12, 16])
        for (sampler, steps), name in zip(VARIANTS, names, strict=True):
            t0 = time.perf_counter()
            k = pred.predict(cond, batch["latents"][:, :1].float(), steps=steps, sampler=sampler,
                             generator=torch.Generator().manual_seed(args.seed + s))
            key_s[name] += time.perf_counter() - t0
            keys[name].append(k)
            z = fill_keys(interp, batch, k, args.fill_steps, args.seed + s + 1, None, None)
            videos[name].append(_to_uint8(ae.decode_scaled(z[:, :16])))
        print(f"windows {min(s + args.batch, len(indices))}/{len(indices)}  " +
              "  ".join(f"{n} keys {key_s[n]:.0f}s" for n in names), flush=True)

    feats_real = i3d_embeddings(real)
    all_keys = {k: torch.cat(v) for k, v in keys.items()}
    ref, fast = all_keys[names[0]], all_keys[names[1]]
    result = {
        "machine": machine(), "windows": len(indices), "real_clips": int(len(real)), "resolution": list(size),
        "key_frames_per_window": 5, "fill_steps": args.fill_steps, "torch_threads": torch.get_num_threads(),
        "checkpoints": {"prediction": str(args.prediction), "interpolation": str(args.interpolation),
                        "autoencoder": str(args.ae)},
        "variants": {n: {"sampler": s, "steps": st, "key_sampling_s": round(key_s[n], 2),
                         "key_sampling_s_per_window": round(key_s[n] / len(indices), 3),
                         "fvd_16": fvd(feats_real, i3d_embeddings(np.concatenate(videos[n])))}
                     for (s, st), n in zip(VARIANTS, names, strict=True)},
        "mean_abs_key_diff": float((fast - ref).abs().mean()), "mean_abs_key_ddim50": float(ref.abs().mean()),
    }
    result["speedup"] = round(key_s[names[0]] / key_s[names[1]], 2)
    write_result(args.out, result)
    print("| key-frame sampler | steps | key sampling s/window | FVD_16 |\n|---|---|---|---|")
    for n in names:
        v = result["variants"][n]
        print(f"| {v['sampler']} | {v['steps']} | {v['key_sampling_s_per_window']:.2f} | {v['fvd_16']:.1f} |")
    print(f"speed-up {result['speedup']}x; mean |dpmpp20 - ddim50| of key latents {result['mean_abs_key_diff']:.4f} "
          f"(mean |ddim50| {result['mean_abs_key_ddim50']:.4f})")
    return result


if __name__ == "__main__":
    main()
