"""Do temporal layers transfer to a fine-tuned image backbone? (Video LDM sec. 4.3) Transferred vs alpha = 1 vs
retrained video models, on one dataset's val clips.

Three prediction + interpolation pairs, all on the spatial U-Net of the same image LDM fine-tuned on this dataset
(the backbone):
(a) `transferred`: `drivesim stack transfer` models: temporal layers of a donor trained on another dataset, spatial
    layers of the backbone (`--transferred-prediction`, `--transferred-interpolation`);
(b) `alpha1`: the (a) models with every alpha forced to 1 (`force_alpha_one`, exactly as `video_ldm_temporal.py`
    does): frames independent, i.e. the fine-tuned image backbone alone;
(c) `retrained`: prediction + interpolation trained on this dataset on top of the backbone
    (`--retrained-prediction`, `--retrained-interpolation`).
Each pair runs the pipeline of `video_ldm_temporal.py` (its functions, not a copy): for the first and the last
17-frame latent window of every val clip, key frames by the prediction model from the first real latent frame
(stride 4), x4 fill by the interpolation model (stage 1), first 16 frames decoded by the autoencoder (`--ae`); the
three rows share the sampling seeds (seed 0, 1000, ... with `--seeds N`), so they start from the same noise. Also
measured: the val clips' own 16-frame windows (real) and the autoencoder's reconstruction of the real latents.

Metrics per row (mean +- sample std over seeds): FVD_16 (I3D) against the real windows and against the
reconstructions (`fvd_vs_recon`: the decoder's floor on both sides), `diff1` = mean |x[t+1] - x[t]| and `diff2` =
mean |x[t+1] - 2 x[t] + x[t-1]| on [0, 1] pixels. FVD is skipped, with the reason, when the I3D weights are absent
or a side has fewer than 2 windows.

Verdict, per metric, with a, b, c the means of (a), (b), (c): `dist_retrained` = |a - c|, `dist_alpha1` = |a - b|,
`closer_to` = "retrained" when |a - c| < |a - b|, else "alpha1" (a tie counts against the transfer), and
`transfer_works` = (a) is closer to (c) than to (b). No combined score: `transfer_works_fvd_recon` and
`transfer_works_diff2` repeat the two metrics that separate temporal layers from the decoder's floor. The report also
checks that (c) sits on the same backbone as (a) (`backbone_check`: their spatial tensors are equal).

    drivesim stack transfer --temporal runs/other/pred/model-ema --backbone runs/ft_image/model-ema \\
        --out runs/transfer/prediction   # and the same for interpolation
    python benchmarks/temporal_transfer.py --data data/sample --cache runs/latents.h5 --ae runs/vdec/model \\
        --transferred-prediction runs/transfer/prediction --transferred-interpolation runs/transfer/interpolation \\
        --retrained-prediction runs/pred_ft/model-ema --retrained-interpolation runs/interp_ft/model-ema \\
        --out runs/temporal_transfer --steps 10 --seeds 3

Writes OUT/report.json (also `--json PATH`) and OUT/i3d_features.npz (when FVD ran), and prints a markdown table.
The report records the protocol, the command, the sha256 of every model's weights (`sha256`), the transferred
models' `model_card.json` (`model_cards`), what each model's folders say about its training (`training`, as
`latent_spaces.py` reads it; a transferred model's two sources via its card), `train_steps` per model
{"temporal": steps of the run that trained its temporal layers (the donor's for a transferred model), "spatial":
steps of the backbone's run (for a retrained model: the transferred one's, when `backbone_check` says they share
it)}, null where no run is found, the machine and the generation seconds. Rows: `rows` (mean/std/min/max over
seeds per metric), `per_seed`, `flicker_real`, `flicker_recon`, `fvd_recon`; then `verdict`.
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
from latent_spaces import training_record, weights_sha256  # noqa: E402
from video_ldm_temporal import (  # noqa: E402
    alpha_stats,
    flicker_measures,
    generate_windows,
    seed_metrics,
    summarize,
    table,
    val_windows,
)

MODELS = ("transferred_prediction", "transferred_interpolation", "retrained_prediction", "retrained_interpolation")
ROWS = ("transferred", "alpha1", "retrained")
METRICS = ("fvd", "fvd_vs_recon", "diff1", "diff2")
RULE = ("per metric, on the means over seeds: transfer_works when |transferred - retrained| < |transferred - "
        "alpha1| (the transferred temporal layers take the backbone closer to temporal layers trained on this "
        "dataset than to no temporal layers); a tie counts against the transfer")


def verdict(summary: dict[str, dict | None]) -> dict:
    """The verdict section from `summarize`'s f"{metric}/{row}" spreads (see the module docstring); a metric whose
    rows are None (FVD skipped) gets None everywhere."""
    metrics = {}
    for m in METRICS:
        spreads = {n: summary[f"{m}/{n}"] for n in ROWS}
        if any(v is None for v in spreads.values()):
            metrics[m] = dict.fromkeys((*ROWS, "dist_retrained", "dist_alpha1", "closer_to", "transfer_works"))
            continue
        a, b, c = (spreads[n]["mean"] for n in ROWS)
        closer = "retrained" if abs(a - c) < abs(a - b) else "alpha1"
        metrics[m] = {"transferred": a, "alpha1": b, "retrained": c, "dist_retrained": abs(a - c),
                      "dist_alpha1": abs(a - b), "closer_to": closer, "transfer_works": closer == "retrained"}
    return {"rule": RULE, "metrics": metrics, "transfer_works_fvd_recon": metrics["fvd_vs_recon"]["transfer_works"],
            "transfer_works_diff2": metrics["diff2"]["transfer_works"]}


def same_spatial(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two video models hold the same image U-Net parameters (`VideoUNet.spatial_parameter_names`, the
    set training freezes; the temporal layers live inside `unet.spatial` too, so a name prefix would not do), bit
    for bit."""
    names = a.unet.spatial_parameter_names
    if names != b.unet.spatial_parameter_names:
        return False
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return all(torch.equal(pa[f"unet.{n}"], pb[f"unet.{n}"]) for n in names)


def model_card(path: Path) -> dict | None:
    """The `model_card.json` beside an exported model (written by `drivesim stack transfer`), or None."""
    card = Path(path) / "model_card.json"
    return json.loads(card.read_text()) if card.is_file() else None


def main(argv: list[str] | None = None) -> dict:
    from drivesim.eval.features import i3d_embeddings
    from drivesim.eval.metrics import fvd
    from drivesim.eval.results import write_json

    import drivesim
    from drivesim.autoencoder import AutoencoderKL
    from drivesim.errors import DrivesimError
    from drivesim.models.video_ldm import InterpolationLDM, PredictionLDM

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="clip-format dataset (its val clips are the real set)")
    ap.add_argument("--cache", type=Path, required=True, help="latent cache of the same dataset (val split)")
    ap.add_argument("--ae", type=Path, required=True, help="exported (video) autoencoder")
    ap.add_argument("--transferred-prediction", type=Path, required=True,
                    help="`drivesim stack transfer` prediction model: donor temporal layers on the backbone")
    ap.add_argument("--transferred-interpolation", type=Path, required=True,
                    help="`drivesim stack transfer` interpolation model: donor temporal layers on the backbone")
    ap.add_argument("--retrained-prediction", type=Path, required=True,
                    help="prediction model trained on this dataset on top of the same backbone")
    ap.add_argument("--retrained-interpolation", type=Path, required=True,
                    help="interpolation model trained on this dataset on top of the same backbone")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the models' config)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="sampling seeds (0, 1000, ...): every row is generated once per seed and reported as "
                         "mean +- std over seeds")
    ap.add_argument("--max-clips", type=int, default=None, help="first N val clips (default: all)")
    ap.add_argument("--batch", type=int, default=8, help="windows per sampling call")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here (benchmarks/results/...)")
    args = ap.parse_args(argv)
    for flag, value in (("--seeds", args.seeds), ("--steps", args.steps), ("--batch", args.batch),
                        ("--max-clips", args.max_clips)):
        if value is not None and value < 1:
            ap.error(f"{flag}: {value} must be >= 1")
    paths = {"data": args.data, "cache": args.cache, "ae": args.ae} | {m: getattr(args, m) for m in MODELS}
    for key, path in paths.items():
        if not path.exists():
            ap.error(f"--{key.replace('_', '-')}: {path} does not exist")

    def load(key: str, cls: type) -> torch.nn.Module:
        flag, path = f"--{key.replace('_', '-')}", paths[key]
        try:
            model = drivesim.load(path)
        except DrivesimError as e:
            ap.error(f"{flag}: {path}: {e}")
        if not isinstance(model, cls):
            ap.error(f"{flag}: {path} holds a model of class {type(model).__name__}, expected {cls.__name__}")
        return model.eval()

    ae = load("ae", AutoencoderKL)
    models = {m: load(m, PredictionLDM if m.endswith("prediction") else InterpolationLDM) for m in MODELS}
    try:
        val, indices, size, real_by_clip = val_windows(args.cache, args.data, args.max_clips)
    except IndexError:  # val_windows reads its first window
        ap.error(f"--cache: {args.cache} has no val clip of 17 latent frames")
    except DrivesimError as e:  # the readers' messages name the file
        ap.error(f"--cache / --data: {e}")
    real = np.concatenate(list(real_by_clip.values()))
    fvd_skipped = fvd_available(len(real))
    if fvd_skipped is None and len(indices) < 2:
        fvd_skipped = f"{len(indices)} generated window(s): a Frechet distance needs >= 2"
    args.out.mkdir(parents=True, exist_ok=True)

    seeds = [1000 * k for k in range(args.seeds)]
    pairs = {"transferred": (models["transferred_prediction"], models["transferred_interpolation"], False),
             "alpha1": (models["transferred_prediction"], models["transferred_interpolation"], True),
             "retrained": (models["retrained_prediction"], models["retrained_interpolation"], False)}
    t0 = time.time()
    gen = generate_windows(pairs, ae, val, indices, seeds, args.batch, args.steps, None, None,
                           log=lambda line: print(line, flush=True))
    gen_s = time.time() - t0

    feats: dict[str, np.ndarray] = {}
    if fvd_skipped is None:
        feats = {"real": i3d_embeddings(real)} | {k: i3d_embeddings(v) for k, v in gen.items()}
    fvd_s = time.time() - t0 - gen_s
    per_seed = {seed: seed_metrics(feats, gen, ROWS, seed) for seed in seeds}
    summary = summarize(list(per_seed.values()), ROWS)

    cards = {m: model_card(paths[m]) for m in MODELS}
    training = {m: training_record(paths[m]) for m in MODELS}
    for m in MODELS[:2]:  # a transferred model was not trained itself: its two sources were
        for part in ("temporal_from", "spatial_from"):
            if cards[m] and part in cards[m]:
                training[m][part] = training_record(Path(cards[m][part]["path"]))
    backbone_check = {task: same_spatial(models[f"transferred_{task}"], models[f"retrained_{task}"])
                      for task in ("prediction", "interpolation")}
    backbone_check["transferred_pair"] = same_spatial(models["transferred_prediction"],
                                                      models["transferred_interpolation"])
    train_steps = {}
    for task in ("prediction", "interpolation"):
        t, r = training[f"transferred_{task}"], training[f"retrained_{task}"]
        spatial = t.get("spatial_from", {}).get("steps")
        train_steps[f"transferred_{task}"] = {"temporal": t.get("temporal_from", {}).get("steps"), "spatial": spatial}
        # the retrained model's spatial tensors are the backbone's only when the check says so
        train_steps[f"retrained_{task}"] = {"temporal": r.get("steps"),
                                            "spatial": spatial if backbone_check[task] else None}
    notes = [f"retrained {task}'s spatial tensors differ from the transferred {task}'s: (c) is not on the same "
             "backbone as (a) (another image LDM, or trained with temporal.train_spatial)"
             for task in ("prediction", "interpolation") if not backbone_check[task]]
    if not backbone_check["transferred_pair"]:
        notes.append("the transferred prediction and interpolation models have different spatial tensors (two "
                     "backbones)")
    for note in notes:
        print(f"NOTE: {note}")

    report = {
        "benchmark": "temporal_transfer",
        "protocol": "first and last 17-frame latent window of every val clip; key frames by the prediction model "
                    "from 1 real context latent (stride 4), filled x4 by the interpolation model (stage 1); first "
                    "16 frames decoded (video_ldm_temporal.py's functions); rows: transferred (stack transfer "
                    "models), alpha1 (the same with every alpha = 1), retrained (trained on this dataset on the "
                    "same backbone), same sampling seeds for all; FVD_16 (I3D) against the real windows and "
                    "against their reconstructions, diff1/diff2 flicker; mean +- sample std over seeds",
        "command": "python benchmarks/temporal_transfer.py " + shlex.join(argv),
        "data": str(args.data), "cache": str(args.cache),
        "models": {k: str(v) for k, v in paths.items() if k not in ("data", "cache")},
        "sha256": {"ae": weights_sha256(args.ae)} | {m: weights_sha256(paths[m]) for m in MODELS},
        "model_cards": {m: cards[m] for m in MODELS[:2]},
        "train_steps": {m: train_steps[m] for m in MODELS}, "training": training, "backbone_check": backbone_check,
        "alphas": {m: alpha_stats(models[m]) for m in MODELS},
        "real_clips": int(len(real)), "generated_clips": int(len(indices)), "frames": 16, "resolution": list(size),
        "steps": args.steps, "seeds": seeds, "batch": args.batch,
        "generation_s": round(gen_s, 1), "fvd_s": round(fvd_s, 1), "fvd_skipped": fvd_skipped,
        "fvd_recon": fvd(feats["real"], feats["recon"]) if feats else None,
        "flicker_real": flicker_measures(real), "flicker_recon": flicker_measures(gen["recon"]),
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "rows": {n: {m: summary[f"{m}/{n}"] for m in METRICS} for n in ROWS},
        "verdict": verdict(summary),
        "notes": notes,
        "machine": machine(),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)
    if feats:
        np.savez_compressed(args.out / "i3d_features.npz", **{k.replace("/", "_"): v for k, v in feats.items()})

    print(f"{len(seeds)} seed(s), mean +- std (sample std over seeds)"
          + (f"; FVD skipped: {fvd_skipped}" if fvd_skipped else ""))
    print(table(summary, ROWS, report["fvd_recon"], report["flicker_real"], report["flicker_recon"]))
    print("\n| metric | \\|a - c\\| (retrained) | \\|a - b\\| (alpha1) | closer to | transfer works |")
    print("|---|---|---|---|---|")
    for m, v in report["verdict"]["metrics"].items():
        if v["closer_to"] is None:
            print(f"| {m} | - | - | - | - |")
        else:
            print(f"| {m} | {v['dist_retrained']:.4g} | {v['dist_alpha1']:.4g} | {v['closer_to']} | "
                  f"{v['transfer_works']} |")
    print(json.dumps({k: report[k] for k in ("real_clips", "generated_clips", "generation_s", "backbone_check")}))
    return report


if __name__ == "__main__":
    main()
