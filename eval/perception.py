"""Perception trainability: what synthetic clips add to a detector, measured at equal optimizer steps.

Protocol (issue 19; MagicDrive's and Panacea's "trainability", Dream4Drive's equal-steps rule): the reference
detector of `drivesim.eval.detector` is trained with one recipe and the same number of optimizer steps on
(a) "real": the real dataset's train split;
(b) "synthetic": the synthetic dataset only (all its clips, or one split);
(c) "mixed": both, each training sample drawn from the synthetic set with probability `synthetic_fraction`
    (`MixedFrames`).
Steps, not epochs, are equal: every run sees `steps * batch_size` frames, so a gain cannot come from training
longer. Each training set is trained once per seed (the seed sets the initial weights, the data order, the flips
and the mixing), and every detector is scored on the REAL val split with `coco_ap` (AP, AP50, AP75 over all boxes
and by size, boxes marked "conditioned": false being ignore regions). A row is the mean and the std (ddof=1; null
with one seed) over seeds.

Training labels of generated clips keep only the boxes that conditioned the frame: a box beyond the generator's
`max_boxes` ("conditioned": false) may or may not be drawn, so it is dropped as the YOLO export drops it (a drawn
one then counts as background); how many were dropped is recorded.

Run folder `out`: `protocol.json` (what the runs depend on; a folder holding runs of another protocol is refused),
`runs/<set>-seed<k>/` (a run of the shared training loop: checkpoints/, model/, history.jsonl, then `score.json`
once scored), `perception.json` (the result) and `report.html`. A second call reuses every scored run without
touching it and resumes an interrupted one from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from drivesim.datasets.torch_data import FrameDataset
from drivesim.eval.box_fidelity import AREA_RANGES, coco_ap, load_clip_frames, load_detector, run_detector
from drivesim.eval.detector import MAX_BOXES, DetectorConfig, default_train_config
from torch.utils.data import Dataset

import drivesim
from drivesim.errors import ConfigError, DataError

SETS = ("real", "synthetic", "mixed")
SET_LABELS = {"real": "(a) real train", "synthetic": "(b) synthetic only", "mixed": "(c) real + synthetic"}
MIN_MIX_SLOTS = 1000  # slots of a mixed epoch: the synthetic share is round(p * slots) / slots, within 0.0005 of p
PROTOCOL_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# training sets
# ----------------------------------------------------------------------------------------------------------------


class LabelledFrames(FrameDataset):
    """`FrameDataset` whose labels keep only the boxes that conditioned the frame (see the module docstring); real
    clips carry no other kind, so for them it is a `FrameDataset`. `dropped_boxes`: how many were left out."""

    def __init__(self, root, split: str | None, size: tuple[int, int], hflip_p: float = 0.0) -> None:
        from drivesim.datasets.clips import pack_annotation

        super().__init__(root, split, size=size, max_boxes=MAX_BOXES, hflip_p=hflip_p)
        self.dropped_boxes = sum(not b.conditioned for a in self.annotations for f in a.frames for b in f)
        if self.dropped_boxes:
            self.annotations = [dataclasses.replace(a, frames=[[b for b in f if b.conditioned] for f in a.frames])
                                for a in self.annotations]
            self.packed = [pack_annotation(a, MAX_BOXES) for a in self.annotations]
        self.num_boxes = sum(len(f) for a in self.annotations for f in a.frames)


class MixedFrames(Dataset):
    """Real and synthetic samples mixed so that a training sample is synthetic with probability `fraction`.

    An epoch has `n = max(len(real) + len(synthetic), MIN_MIX_SLOTS)` slots; `round(fraction * n)` of them, chosen
    by a permutation seeded with `seed`, are synthetic. The k-th slot of a source takes item `perm[k % len]` of
    that source (a seeded permutation), so each source is covered evenly. The training loop visits the slots in
    its own seeded order, so any run of drawn samples is synthetic in proportion `fraction` (exactly so over an
    epoch, up to the rounding). Deterministic for a seed.

    Args:
        real, synthetic: map-style datasets with items of one layout.
        fraction: in [0, 1]; 0 never draws a synthetic sample, 1 never a real one.

    Raises:
        ValueError: fraction outside [0, 1], or an empty source that the fraction needs.
    """

    def __init__(self, real: Dataset, synthetic: Dataset, fraction: float, seed: int) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        n_real, n_syn = len(real), len(synthetic)  # type: ignore[arg-type]
        n = max(n_real + n_syn, MIN_MIX_SLOTS)
        k = round(fraction * n)
        if (k and not n_syn) or (k < n and not n_real):
            raise ValueError(f"fraction {fraction} needs both sources; got {n_real} real, {n_syn} synthetic")
        rng = np.random.default_rng([seed, 0x6D6978])
        self.from_synthetic = np.zeros(n, bool)
        self.from_synthetic[rng.permutation(n)[:k]] = True
        real_order, syn_order = rng.permutation(max(n_real, 1)), rng.permutation(max(n_syn, 1))
        rank_syn = np.cumsum(self.from_synthetic) - 1
        rank_real = np.cumsum(~self.from_synthetic) - 1
        self.item = np.where(self.from_synthetic, syn_order[rank_syn % max(n_syn, 1)],
                             real_order[rank_real % max(n_real, 1)])
        self.real, self.synthetic = real, synthetic

    def __len__(self) -> int:
        return len(self.item)

    def __getitem__(self, index: int):
        source = self.synthetic if self.from_synthetic[index] else self.real
        return source[int(self.item[index])]


def drawn_indices(num_samples: int, batch_size: int, seed: int, steps: int) -> np.ndarray:
    """The dataset indices a single-process run of the training loop draws in `steps` steps of `batch_size`
    (its `DataStream` replayed on indices): (steps * batch_size,) int64."""
    from drivesim.training.data import DataStream

    stream = DataStream(range(num_samples), batch_size, seed, 0, 1)  # type: ignore[arg-type]
    return np.concatenate([np.asarray(stream.next(), np.int64) for _ in range(steps)]) if steps else \
        np.zeros(0, np.int64)


# ----------------------------------------------------------------------------------------------------------------
# the protocol
# ----------------------------------------------------------------------------------------------------------------


def check_options(steps: int, seeds: Sequence[int], synthetic_fraction: float, batch_size: int) -> None:
    """Raises ConfigError naming the first bad flag."""
    if steps < 1:
        raise ConfigError(f"--steps: {steps}; must be >= 1 (runs are compared at equal optimizer steps)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: {batch_size}; must be >= 1")
    if not seeds:
        raise ConfigError("--seeds: no seed given")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: {' '.join(map(str, seeds))} repeats a seed")
    if any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds: {' '.join(map(str, seeds))}; seeds must be >= 0")
    if not 0.0 < synthetic_fraction < 1.0:
        raise ConfigError(f"--synthetic-fraction: {synthetic_fraction}; must be strictly between 0 and 1 (0 and 1 "
                          "are the real-only and synthetic-only rows)")


def run_train_config(steps: int, batch_size: int, seed: int, checkpoint_every: int = 200):
    """The detector's recipe (`default_train_config`) at `steps` optimizer steps: the warmup is capped at a tenth of
    the run (50 steps at the recipe's 1200)."""
    base = default_train_config()
    return dataclasses.replace(base, max_steps=steps, batch_size=batch_size, seed=seed,
                               warmup_steps=min(base.warmup_steps, max(1, steps // 10)),
                               checkpoint_every=max(1, min(checkpoint_every, steps)),
                               log_every=max(1, min(base.log_every, steps)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _identity(protocol: dict[str, Any]) -> dict[str, Any]:
    """What the runs depend on, as JSON reads it back: the protocol without the datasets' paths (a moved dataset
    with the same manifest is the same data)."""
    plain = json.loads(json.dumps(protocol))
    for side in ("real", "synthetic"):
        plain[side].pop("path", None)
    return plain


def _first_difference(old: Any, new: Any, where: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
    return f"{where or '<root>'}: the runs were made with {json.dumps(old)}, not {json.dumps(new)}"


def _check_out(out: Path, protocol: dict[str, Any]) -> None:
    """Write `out/protocol.json`, or refuse a folder whose runs were made under another protocol."""
    from drivesim.atomic import write_json_atomic

    path = out / "protocol.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: protocol: unreadable ({e}); use another --out") from None
        if not isinstance(old, dict) or not all(isinstance(old.get(s), dict) for s in ("real", "synthetic")):
            raise DataError(f"{path}: protocol: not a perception protocol; use another --out")
        if _identity(old) != _identity(protocol):
            raise ConfigError(f"{path}: {_first_difference(_identity(old), _identity(protocol))}; use another "
                              "--out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, protocol)


def _summary(values: list[float | None]) -> dict[str, Any]:
    """{"mean", "std" (ddof=1, None for one value), "runs"}; all None when a value is None (an empty bucket)."""
    if any(v is None for v in values):
        return {"mean": None, "std": None, "runs": values}
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            "runs": [float(v) for v in arr]}


def _row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ap = {bucket: {**{k: _summary([r["ap"][bucket][k] for r in runs]) for k in ("AP", "AP50", "AP75")},
                   "num_gt": runs[0]["ap"][bucket]["num_gt"]} for bucket in AREA_RANGES}
    return {"seeds": [r["seed"] for r in runs], "ap": ap}


def compare(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's two questions on AP50 (all boxes): (b) / (a), and (c)'s relative gain over (a), with whether the
    mean +- std intervals of (c) and (a) are apart."""
    a, b, c = (rows[s]["ap"]["all"]["AP50"] for s in SETS)
    out: dict[str, Any] = {"synthetic_over_real_ap50": None, "mixed_gain_over_real_ap50": None,
                           "mixed_beats_real_outside_std": None}
    if a["mean"]:
        out["synthetic_over_real_ap50"] = b["mean"] / a["mean"]
        out["mixed_gain_over_real_ap50"] = (c["mean"] - a["mean"]) / a["mean"]
    if a["std"] is not None and c["std"] is not None:
        out["mixed_beats_real_outside_std"] = bool(c["mean"] - c["std"] > a["mean"] + a["std"])
    return out


def evaluate_perception(real, synthetic, out, *, steps: int = 1200, seeds: Sequence[int] = (0, 1, 2),
                        synthetic_fraction: float = 0.5, synthetic_split: str | None = None, batch_size: int = 16,
                        config: DetectorConfig | None = None, checkpoint_every: int = 200, hflip_p: float = 0.5,
                        progress: bool = True, log: Callable[[str], None] | None = None,
                        command: str | None = None) -> dict[str, Any]:
    """Train and score the three training sets x `seeds` (see the module docstring) and write `out/perception.json`.

    Args:
        real: clip-format dataset with a train and a val split. synthetic: clip-format dataset (e.g. from
            `drivesim generate`); `synthetic_split` None takes all its clips.
        steps: optimizer steps of every run. batch_size: frames per step. config: the detector (default: the
            shipped one's, 128x256). checkpoint_every: steps between a run's checkpoints (what a crash can lose).
        log: called with one line per run (None: silent).

    Returns:
        the record: {"kind": "perception", "command", "protocol", "rows": {set: {"label", "seeds", "ap": {bucket:
        {"AP"/"AP50"/"AP75": {"mean", "std", "runs"}, "num_gt"}}}}, "runs": [per run: "set", "seed", "steps",
        "skipped_steps", "detector_sha256", "synthetic_fraction_drawn", "ap", "reused"], "comparison"}.

    Raises:
        ConfigError: a bad flag, or `out` holding runs of another protocol. DataError: a dataset without the needed
            split, without boxes, or smaller than one batch. CheckpointError: as the training loop.
    """
    import torch
    from drivesim.eval.detector import fit_detector

    say = log or (lambda _line: None)
    seeds = [int(s) for s in seeds]
    check_options(steps, seeds, synthetic_fraction, batch_size)
    config = config or DetectorConfig()
    size = tuple(config.resolution)
    stride = 2 ** (len(config.channel_mult) - 1)
    if size[0] % stride or size[1] % stride:
        raise ConfigError(f"--size: {size[0]}x{size[1]}; the detector needs multiples of {stride} (its stride)")
    real, synthetic, out = Path(real), Path(synthetic), Path(out)

    # everything the runs need is read and checked before the first step
    val = load_clip_frames(real, "val", size)
    val_boxes = sum(int((~np.asarray(fb.ignore, bool)).sum()) if fb.ignore is not None else len(fb.classes)
                    for fb in val.boxes)
    if not val_boxes:
        raise DataError(f"{real / 'manifest.json'}: val split: no boxes to score a detector against")
    train_sets = {"real": LabelledFrames(real, "train", size, hflip_p),
                  "synthetic": LabelledFrames(synthetic, synthetic_split, size, hflip_p)}
    for root, ds, split in ((real, train_sets["real"], "train"),
                            (synthetic, train_sets["synthetic"], synthetic_split or "all")):
        if not ds.num_boxes:
            raise DataError(f"{root / 'manifest.json'}: {split} split: no boxes to train a detector on")
        if len(ds) < batch_size:
            raise DataError(f"{root / 'manifest.json'}: {split} split: {len(ds)} frames, fewer than one batch "
                            f"(--batch-size {batch_size})")
    if synthetic_split != "train" and _sha256(synthetic / "manifest.json") == _sha256(real / "manifest.json"):
        raise ConfigError(f"{synthetic}: --synthetic: is --real itself, and its {synthetic_split or 'all'} clips "
                          "include the val split that scores every run; use --synthetic-split train")

    recipe = run_train_config(steps, batch_size, 0, checkpoint_every)
    protocol = {
        "version": PROTOCOL_VERSION,
        "real": {"path": str(real.resolve()), "manifest_sha256": _sha256(real / "manifest.json"),
                 "train_split": "train", "train_clips": len(train_sets["real"].entries),
                 "train_frames": len(train_sets["real"]), "val_clips": len(val.clip_ids),
                 "val_frames": int(len(val.frames)), "val_boxes": val_boxes},
        "synthetic": {"path": str(synthetic.resolve()), "manifest_sha256": _sha256(synthetic / "manifest.json"),
                      "split": synthetic_split or "all", "clips": len(train_sets["synthetic"].entries),
                      "frames": len(train_sets["synthetic"]),
                      "unconditioned_boxes_dropped": train_sets["synthetic"].dropped_boxes},
        "steps": steps, "batch_size": batch_size, "synthetic_fraction": synthetic_fraction,
        "detector": dataclasses.asdict(config), "hflip_p": hflip_p,
        "train": {k: v for k, v in dataclasses.asdict(recipe).items()
                  if k in ("lr", "weight_decay", "betas", "warmup_steps", "lr_schedule", "grad_clip", "ema_decay",
                           "mixed_precision", "grad_accum_steps")},
    }
    _check_out(out, protocol)
    digest = _digest(_identity(protocol))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    runs = []
    for seed in seeds:  # seeds outside: the first seed's three rows are complete before any second seed starts
        for name in SETS:
            run_dir = out / "runs" / f"{name}-seed{seed}"
            score_path = run_dir / "score.json"
            scored = _reusable(score_path, digest)
            if scored is not None:
                say(f"{SET_LABELS[name]}, seed {seed}: reused {run_dir}")
                runs.append({**scored, "reused": True})
                continue
            dataset = train_sets[name] if name != "mixed" else \
                MixedFrames(train_sets["real"], train_sets["synthetic"], synthetic_fraction, seed)
            say(f"{SET_LABELS[name]}, seed {seed}: training {steps} steps in {run_dir}")
            tc = run_train_config(steps, batch_size, seed, checkpoint_every)
            fit_detector(dataset, run_dir, config, tc, resume=True, progress=progress)
            runs.append({**_score(run_dir, name, seed, digest, val.frames, val.boxes, dataset, tc, device),
                         "reused": False})
            ap50 = runs[-1]["ap"]["all"]["AP50"]
            say(f"{SET_LABELS[name]}, seed {seed}: AP50 {ap50:.3f} on {len(val.frames)} real val frames")

    rows = {name: {"label": SET_LABELS[name], **_row([r for r in runs if r["set"] == name])} for name in SETS}
    record = {
        "kind": "perception",
        "command": command,
        "protocol": {**protocol, "protocol_sha256": digest, "seeds": seeds, "drivesim_version": drivesim.__version__,
                     "scored_on": "the real dataset's val split, the clips' own boxes ('conditioned': false = "
                                  "ignore region)",
                     "iou_thresholds": "0.50:0.05:0.95", "max_detections": 100,
                     "area_ranges_px2": {k: list(v) for k, v in AREA_RANGES.items()},
                     "std": "ddof=1 over seeds; null with one seed"},
        "rows": rows,
        "runs": runs,
        "comparison": compare(rows),
    }
    from drivesim.eval.perception_report import write_report
    from drivesim.eval.results import write_result

    write_result(out / "perception.json", record)
    first = seeds[0]
    write_report(out, record, {"real": train_sets["real"], "synthetic": train_sets["synthetic"],
                               "mixed": MixedFrames(train_sets["real"], train_sets["synthetic"], synthetic_fraction,
                                                    first)},
                 val, {name: out / "runs" / f"{name}-seed{first}" for name in SETS}, device)
    return record


def _reusable(score_path: Path, digest: str) -> dict[str, Any] | None:
    """A run's score when it was made under this protocol and its weights are the ones scored; else None."""
    if not score_path.is_file():
        return None
    try:
        scored = json.loads(score_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    weights = score_path.parent / "model" / "model.safetensors"
    if scored.get("protocol_sha256") != digest or not weights.is_file() or \
            _sha256(weights) != scored.get("detector_sha256"):
        return None
    return scored


def _score(run_dir: Path, name: str, seed: int, digest: str, frames: np.ndarray, truth, dataset, tc,
           device: str) -> dict[str, Any]:
    """Score a trained run on the real val frames and write its `score.json`."""
    from drivesim.atomic import write_json_atomic
    from drivesim.training import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir / ckpt.CHECKPOINTS_DIR)
    state = ckpt.read_json(latest / ckpt.TRAINER_STATE)
    detector, sha = load_detector(run_dir, device)
    ap = coco_ap(run_detector(detector, frames, device=device), truth)
    drawn = None
    if isinstance(dataset, MixedFrames):
        drawn = float(dataset.from_synthetic[drawn_indices(len(dataset), tc.batch_size, seed, tc.max_steps)].mean())
    scored = {"set": name, "seed": seed, "steps": int(state["step"]),
              "skipped_steps": int(state.get("bad_steps_total", 0)), "run": str(run_dir),
              "detector_sha256": sha, "synthetic_fraction_drawn": {"real": 0.0, "synthetic": 1.0}.get(name, drawn),
              "protocol_sha256": digest, "ap": ap}
    write_json_atomic(run_dir / "score.json", scored)
    return scored
