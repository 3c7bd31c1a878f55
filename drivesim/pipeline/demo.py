"""The demo (`drivesim demo`): the whole stack end to end on a clip-format dataset, resumable stage by stage.

Stages, in order (`STEPS`); each writes under OUT (default runs/demo):

    autoencoder     train/autoencoder/          KL-f8 image autoencoder (engine `train`, STAGES builder)
    encode          latents.h5                  latent cache (`drivesim encode`; the scale factor goes into the
                                                exported autoencoder, so the video decoder inherits it)
    video_decoder   train/video_decoder/        video fine-tuning of the decoder (encoder frozen)
    image_ldm       train/image_ldm/            box + day/night conditioned image LDM on the latent cache
    prediction      train/prediction/           key-frame prediction model (temporal layers, frozen spatial)
    interpolation   train/interpolation/        x4 interpolation model
    scenarios       scenarios/{day,night}.json  val clips of each label chained to the rollout length
    rollout         stack/ rollouts/{day,night}/ rollouts/clips/   `drivesim rollout` machinery (streamed,
                                                resumable); stack/ is the checkpoint dir it expects
    eval            eval/videos.json eval/fvd_over_time.json   FVD_16 / FID / KVD vs the val clips, FVD over time
    report          report.html report.json     `drivesim report` engine + the run's preset, budgets, timings

`demo_state.json` records every finished stage (config hash, wall time, what it produced). A stage is skipped
when it is recorded as done with the same config hash and its output exists; a stage that was started with the
same hash but not finished resumes (training from its latest checkpoint, a rollout with --resume); a stage whose
hash changed starts again from scratch, and so does everything after it. `--from-stage S` re-runs S and the
stages after it (their outputs are removed first) and reuses the finished stages before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from drivesim.errors import ConfigError, DataError

STEPS = ("autoencoder", "encode", "video_decoder", "image_ldm", "prediction", "interpolation", "scenarios",
         "rollout", "eval", "report")
TRAIN_STEPS = ("autoencoder", "video_decoder", "image_ldm", "prediction", "interpolation")
STATE_FORMAT = "drivesim-demo-state"
STATE_VERSION = 1

# Optimizer steps per training stage (TrainConfig.max_steps) of the demo: a step budget gives the same models on
# any machine, loaded or not (a wall-clock budget gave the autoencoder 150 steps on a quiet machine and 56 under
# load). cpu-small: calibrated so the demo stays under ~25 minutes on 2 cores (the autoencoder entry applies with
# --train-autoencoder; by default the shipped one is used). --budget-minutes STAGE=M adds a wall-clock limit.
DEFAULT_STEPS: dict[str, dict[str, int]] = {
    "cpu-small": {"autoencoder": 150, "video_decoder": 25, "image_ldm": 1200, "prediction": 110,
                  "interpolation": 80},
}
# Measured seconds per optimizer step of the cpu-small stages on one thread of a 2-core CPU (for the ETA only).
SECONDS_PER_STEP: dict[str, dict[str, float]] = {
    "cpu-small": {"autoencoder": 1.2, "video_decoder": 3.5, "image_ldm": 0.3, "prediction": 1.3,
                  "interpolation": 1.1},
}
# Per-preset demo settings: rollout minutes, sampler steps of every rollout model call, eval windows per side
# (None: all val windows), FVD-over-time pooling, and rough minutes of the untimed stages (for the ETA only).
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"rollout_minutes": 0.06, "rollout_sets": [], "eval_n": 2, "pool": 1,
             "estimate_min": {"autoencoder": 0.2, "encode": 0.3, "video_decoder": 0.2, "image_ldm": 0.1,
                              "prediction": 0.1, "interpolation": 0.1, "scenarios": 0.01, "rollout": 0.3,
                              "eval": 1.0, "report": 0.1}},
    # 2 x 2 minutes at 10 fps is ~1500 U-Net calls per rollout even at 4 sampler steps without context guidance
    # (7.5 GFLOP per 5-frame call at cpu-small): the most a 2-core CPU affords inside the 30-minute demo
    "cpu-small": {"rollout_minutes": 2.0, "rollout_sets": ["steps=4", "context_guidance=1.0"], "eval_n": 16,
                  "pool": 4,
                  "estimate_min": {"encode": 1.0, "scenarios": 0.02, "rollout": 18.0, "eval": 6.0, "report": 0.3}},
}
FALLBACK_DEFAULTS = DEMO_DEFAULTS["cpu-small"]

def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(root: Path) -> str:
    """sha256 of the dataset's manifest and the names and sizes of its files (cheap; no video decoding)."""
    h = hashlib.sha256((root / "manifest.json").read_bytes())
    for f in sorted(root.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def parse_budgets(items: list[str], flag: str = "--budget-minutes", integer: bool = False) -> dict[str, float]:
    """`["image_ldm=6", ...]` -> {"image_ldm": 6.0} (`integer`: step counts, {"image_ldm": 6}).

    Raises:
        ConfigError: not stage=value, a stage that does not train, or a non-positive (or, for steps, non-integer)
            number; the message names `flag`.
    """
    what = "STEPS" if integer else "MINUTES"
    out: dict[str, float] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in TRAIN_STEPS:
            raise ConfigError(f"{flag}: {item!r}: expected STAGE={what} with STAGE one of {', '.join(TRAIN_STEPS)}")
        try:
            value = int(raw) if integer else float(raw)
            if not (math.isfinite(value) and value > 0):
                raise ValueError
        except ValueError:
            kind = "a positive integer number of steps" if integer else "a positive number of minutes"
            raise ConfigError(f"{flag}: {name}: expected {kind}, got {raw!r}") from None
        out[name] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------------------------


class DemoState:
    """`OUT/demo_state.json`: per stage {"status": "started" | "done", "hash", "started", "finished", "seconds",
    "info"}; written atomically after every change."""

    def __init__(self, out: Path):
        self.path = out / "demo_state.json"
        self.data: dict[str, Any] = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "stages": {}}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{self.path}: demo state: not valid JSON ({e}); remove it to start over") from None
            if not isinstance(data, dict) or data.get("format") != STATE_FORMAT \
                    or not isinstance(data.get("stages"), dict):
                raise DataError(f"{self.path}: format: not a drivesim demo state; remove it or choose another --out")
            self.data = data

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def save(self) -> None:
        from drivesim.datasets.clips import write_json_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.data)

    def is_done(self, name: str, digest: str) -> bool:
        rec = self.stages.get(name)
        return bool(rec) and rec.get("status") == "done" and rec.get("hash") == digest

    def start(self, name: str, digest: str) -> None:
        self.stages[name] = {"status": "started", "hash": digest, "started": _now()}
        self.save()

    def finish(self, name: str, seconds: float, info: dict[str, Any]) -> None:
        rec = self.stages[name]
        rec.update({"status": "done", "finished": _now(), "seconds": round(seconds, 2), "info": info})
        self.save()

    def drop(self, name: str) -> None:
        if self.stages.pop(name, None) is not None:
            self.save()


# --------------------------------------------------------------------------------------------------------------
# evaluation helpers
# --------------------------------------------------------------------------------------------------------------


def memoized_extractors(ex):
    """Wrap `Extractors` so each distinct clip / frame is embedded once per demo (the real val windows are
    shared by FVD_16 and FVD over time, and the drawn rollout windows by both)."""
    import numpy as np

    from drivesim.eval.protocols import Extractors

    def memo(fn, cache: dict):
        def call(x):
            x = np.asarray(x)
            keys = [hashlib.sha1(np.ascontiguousarray(item).tobytes()).hexdigest() for item in x]
            todo = [i for i, k in enumerate(keys) if k not in cache]
            if todo:
                feats = np.asarray(fn(x[todo]))
                for i, f in zip(todo, feats, strict=True):
                    cache[keys[i]] = f
            return np.stack([cache[k] for k in keys])
        return call

    return Extractors(memo(ex.video, {}), memo(ex.frame, {}), ex.info)


# --------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DemoSettings:
    data: Path
    preset_name: str
    out: Path
    from_stage: str | None
    budgets: dict[str, float | None]  # wall-clock minutes per stage (only what --budget-minutes asked for)
    rollout_minutes: float
    rollout_sets: list[str]
    eval_n: int | None
    pool: int
    seed: int
    quiet: bool
    as_json: bool
    estimate_min: dict[str, float]
    threads: int | None = None
    train_autoencoder: bool = False  # train the autoencoder even when the preset ships one (drivesim.pretrained)
    from_scratch: bool = False  # train every stage (no shipped autoencoder or image LDM)
    steps: dict[str, int] = dataclasses.field(default_factory=dict)  # optimizer steps per stage (the budget)
    detector: Path | None = None  # reference box detector (None: the shipped one for this data, if any)


class Demo:
    def __init__(self, s: DemoSettings):
        from rich.console import Console

        from drivesim.configs import get_preset

        self.s = s
        self.preset = get_preset(s.preset_name)
        # --json keeps stdout for the summary: stage logs go to stderr
        self.console = Console(stderr=s.as_json, quiet=s.quiet, soft_wrap=True, highlight=False)
        self.state = DemoState(s.out)
        self.hashes: dict[str, str] = {}
        self.t_start = time.monotonic()
        self.data_fp = data_fingerprint(s.data)

    # ---- config hashes -------------------------------------------------------------------------------------
    def train_cfg(self, name: str):
        tc = self.preset.train[name]
        return dataclasses.replace(tc, max_steps=self.s.steps.get(name, tc.max_steps),
                                   max_minutes=self.s.budgets.get(name), seed=tc.seed + self.s.seed)

    def rollout_config(self):
        from drivesim.pipeline.rollout import resolve_config

        fps = self._data_fps() / self.preset.interpolation.frame_stride
        h, w = self.preset.resolution
        return resolve_config(None, [f"fps={fps}", f"resolution=[{h}, {w}]", *self.s.rollout_sets], False)

    def _data_fps(self) -> float:
        from drivesim.datasets.clips import read_annotation, read_manifest

        entries = read_manifest(self.s.data).clips
        return float(read_annotation(entries[0].annotation).fps)

    def stage_hash(self, name: str) -> str:
        from drivesim.configs import to_dict

        p = self.preset
        prev = {STEPS[i]: self.hashes.get(STEPS[i]) for i in range(STEPS.index(name))}
        parts: dict[str, Any] = {"stage": name, "preset": self.s.preset_name}
        if name == "autoencoder" and self.pretrained_autoencoder() is not None:
            from drivesim.pretrained import weights_sha256

            parts |= {"pretrained": weights_sha256(self.pretrained_autoencoder())}
        elif name == "autoencoder":
            parts |= {"data": self.data_fp, "model": to_dict(p.autoencoder), "resolution": list(p.resolution),
                      "train": to_dict(self.train_cfg(name))}
        elif name == "encode":
            parts |= {"up": prev["autoencoder"], "resolution": list(p.resolution)}
        elif name == "video_decoder":
            parts |= {"up": prev["encode"], "model": to_dict(p.autoencoder), "train": to_dict(self.train_cfg(name))}
        elif name == "image_ldm" and self.pretrained_image_ldm() is not None:
            from drivesim.pretrained import weights_sha256

            parts |= {"up": prev["encode"], "pretrained": weights_sha256(self.pretrained_image_ldm())}
        elif name == "image_ldm":
            parts |= {"up": prev["encode"], "model": to_dict(p.image_ldm), "train": to_dict(self.train_cfg(name))}
        elif name in ("prediction", "interpolation"):
            parts |= {"up": prev["image_ldm"], "model": to_dict(getattr(p, name)),
                      "train": to_dict(self.train_cfg(name))}
        elif name == "scenarios":
            cfg = self.rollout_config()
            parts |= {"data": self.data_fp, "minutes": self.s.rollout_minutes, "fps": cfg.fps,
                      "resolution": list(cfg.resolution)}
        elif name == "rollout":
            parts |= {"up": [prev[k] for k in ("video_decoder", "image_ldm", "prediction", "interpolation",
                                               "scenarios")],
                      "config": to_dict(self.rollout_config()), "seed": self.s.seed}
        elif name == "eval":
            det = self.detector()
            parts |= {"up": prev["rollout"], "n": self.s.eval_n, "pool": self.s.pool, "seed": self.s.seed,
                      "detector": None if det is None else str(Path(det).resolve())}
        else:
            parts |= {"up": prev}
        return _sha(parts)

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def stage_outputs(self, name: str) -> list[Path]:
        o = self.s.out
        return {"autoencoder": [o / "train" / "autoencoder"], "encode": [o / "latents.h5"],
                "video_decoder": [o / "train" / "video_decoder"], "image_ldm": [o / "train" / "image_ldm"],
                "prediction": [o / "train" / "prediction"], "interpolation": [o / "train" / "interpolation"],
                "scenarios": [o / "scenarios"], "rollout": [o / "stack", o / "rollouts"], "eval": [o / "eval"],
                "report": [o / "report.html", o / "report.json"]}[name]

    def _remove_outputs(self, name: str) -> None:
        for p in self.stage_outputs(name):
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)

    def _outputs_exist(self, name: str) -> bool:
        info = self.state.stages.get(name, {}).get("info", {})
        checks = [Path(info["export"])] if "export" in info else self.stage_outputs(name)
        if name == "eval" and info.get("skipped"):
            return True
        return all(p.exists() for p in checks)

    def eta_text(self, index: int) -> str:
        left = 0.0
        for name in STEPS[index:]:
            if self.state.is_done(name, self.hashes.get(name, "")):
                continue
            budget = None
            shipped = (name == "autoencoder" and self.pretrained_autoencoder() is not None) or (
                name == "image_ldm" and self.pretrained_image_ldm() is not None)
            if name in TRAIN_STEPS and not shipped:
                tc = self.train_cfg(name)
                rate = SECONDS_PER_STEP.get(self.s.preset_name, {}).get(name)
                budget = tc.max_steps * rate / 60 if rate is not None else None
                if tc.max_minutes is not None:
                    budget = min(budget, tc.max_minutes) if budget is not None else tc.max_minutes
            left += (budget + 0.3) if budget is not None else self.s.estimate_min.get(name, 0.5)
        done_at = _dt.datetime.now(_dt.UTC) + _dt.timedelta(minutes=left)
        return f"about {left:.0f} min left (done ~{done_at:%H:%M} UTC)" if left >= 1 else "about 1 min left"

    # ---- main loop -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        s = self.s
        s.out.mkdir(parents=True, exist_ok=True)
        self.state.data.update({"preset": s.preset_name, "data": str(s.data), "seed": s.seed})
        start_idx = STEPS.index(s.from_stage) if s.from_stage else 0
        redo = False  # once a stage runs, every later one runs too (its inputs changed)
        for i, name in enumerate(STEPS):
            digest = self.stage_hash(name)
            self.hashes[name] = digest
            done = self.state.is_done(name, digest) and self._outputs_exist(name)
            forced = s.from_stage is not None and i >= start_idx
            if i < start_idx and not done:
                raise ConfigError(f"--from-stage {s.from_stage}: stage {name} before it is not finished in "
                                  f"{s.out} (or its config changed); run without --from-stage")
            if done and not redo and not forced:
                self._say_skip(i, name)
                continue
            rec = self.state.stages.get(name) or {}
            resumable = rec.get("status") == "started" and rec.get("hash") == digest and not redo and not forced
            if not resumable:
                self._remove_outputs(name)
            redo = True
            self.state.start(name, digest)
            threads = self.set_threads()
            self.console.rule(f"[bold]{i + 1}/{len(STEPS)} {name}[/bold]  ({self.eta_text(i)})", align="left")
            t0 = time.monotonic()
            with self._stdout():
                info = getattr(self, f"_run_{name}")(resumable)
            seconds = time.monotonic() - t0
            if resumable:  # the wall time of the interrupted call(s) is not known: say that the number is partial
                info["resumed"] = "continued an interrupted run; the wall time is this call's only"
            self.state.finish(name, seconds, {**info, "torch_threads": threads})
            self.console.print(f"[green]{name} done[/green] in {seconds / 60:.1f} min", highlight=False)
        return self.summary()

    def set_threads(self) -> int:
        """torch intra-op threads for the next stage: `--threads`, or with "auto" the cores not already busy
        (1-minute load average) and at least 1. On a shared machine two OpenMP threads on two busy cores spin
        waiting for each other: a cpu-small U-Net call measured 20 s with 2 threads vs 0.7 s with 1 (load ~10)."""
        import torch

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if self.s.threads is not None:
            n = self.s.threads
        else:
            n = max(1, min(cpus, round(cpus - os.getloadavg()[0])))
        torch.set_num_threads(n)
        return n

    def _say_skip(self, i: int, name: str) -> None:
        rec = self.state.stages[name]
        self.console.print(f"[dim]{i + 1}/{len(STEPS)} {name}: reusing the finished stage "
                           f"({rec.get('seconds', 0):.0f} s "
                           f"on {rec.get('finished', '?')})[/dim]", highlight=False)

    @contextlib.contextmanager
    def _stdout(self):
        """Stage output (training logs, typer.echo) goes to stderr with --json and nowhere with --quiet."""
        if self.s.quiet:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                yield
        elif self.s.as_json:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        else:
            yield

    # ---- training stages -----------------------------------------------------------------------------------
    def _train(self, name: str, data_path: Path, **opts: str) -> dict[str, Any]:
        from drivesim.pipeline.train import train_stage

        tc = self.train_cfg(name)
        preset = dataclasses.replace(self.preset, train={**self.preset.train, name: tc})
        run_dir = self.s.out / "train" / name
        budget = f"{tc.max_minutes:g} min" if tc.max_minutes else f"{tc.max_steps} steps"
        self.console.print(f"training {name} (preset {self.s.preset_name}, budget {budget}, at most "
                           f"{tc.max_steps} steps, batch {tc.batch_size}) -> {run_dir}", highlight=False)
        result = train_stage(name, preset, data_path, run_dir, opts=opts,
                             progress=not (self.s.quiet or self.s.as_json))
        # the EMA average only helps once it has seen a few of its time constants of updates
        use_ema = result.ema_export_dir is not None and tc.ema_decay > 0 and result.step >= 2 / (1 - tc.ema_decay)
        export = result.ema_export_dir if use_ema else result.export_dir
        return {"export": str(export), "weights": "EMA" if use_ema else "live", "steps": result.step,
                "stop_reason": result.stop_reason, "steps_per_s": round(result.steps_per_s, 3),
                "train_seconds": round(result.elapsed_s, 1),
                "final_loss": None if result.final_loss is None else round(float(result.final_loss), 5),
                "budget_minutes": tc.max_minutes, "max_steps": tc.max_steps, "batch_size": tc.batch_size}

    def _export(self, name: str) -> Path:
        return Path(self.state.stages[name]["info"]["export"])

    def pretrained_autoencoder(self) -> Path | None:
        """The autoencoder drivesim ships for this preset (None: none shipped, or `--train-autoencoder`)."""
        from drivesim.pretrained import shipped_checkpoint

        return None if self.s.train_autoencoder else shipped_checkpoint("autoencoder", self.s.preset_name)

    def _run_autoencoder(self, resume: bool) -> dict:
        shipped = self.pretrained_autoencoder()
        if shipped is None:
            return self._train("autoencoder", self.s.data)
        return self._install_shipped("autoencoder", shipped, to_dict_cfg, self.preset.autoencoder,
                                     "--train-autoencoder")

    def _install_shipped(self, name: str, shipped: Path, as_dict, preset_block, flag: str) -> dict:
        """Install a shipped checkpoint as stage `name`'s export (a copy under OUT/train/NAME/model), after checking
        that `as_dict` of its config equals that of the preset's block; the stage record names it and its card."""
        from drivesim.pretrained import install_checkpoint, model_card, weights_sha256
        from drivesim.training.checkpoint import load_model

        card = model_card(shipped)
        export = install_checkpoint(shipped, self.s.out / "train" / name / "model")
        if as_dict(load_model(export).config) != as_dict(preset_block):
            raise ConfigError(f"{shipped}: config: the shipped {name} does not match preset {self.s.preset_name}'s "
                              f"{name} block; use {flag}")
        self.console.print(f"{name}: the pretrained {shipped.name} ({card.get('steps')} steps; "
                           f"{card.get('summary', '')}) -> {export}  ({flag} trains one instead)", highlight=False)
        return {"export": str(export), "weights": "pretrained", "pretrained": str(shipped),
                "sha256": weights_sha256(shipped), "steps": card.get("steps"), "stop_reason": "shipped",
                "batch_size": card.get("batch_size"), "max_steps": card.get("steps"), "budget_minutes": None,
                "final_loss": card.get("final_loss"), "steps_per_s": None}

    def _run_encode(self, resume: bool) -> dict:
        from drivesim.pipeline.encode import encode_dataset

        out = self.s.out / "latents.h5"
        self.console.print(f"encoding every clip of {self.s.data} with {self._export('autoencoder')} -> {out}",
                           highlight=False)
        r = encode_dataset(self._export("autoencoder"), self.s.data, out, size=tuple(self.preset.resolution),
                           overwrite=True, log=print)
        self.console.print(f"wrote {r['path']} (scale_factor {r['scale_factor']:.5f})", highlight=False)
        from drivesim.datasets.latent_cache import LatentCache

        cache = LatentCache(out)
        try:
            info = {"scale_factor": round(cache.scale_factor, 5), "clips": len(cache.clip_ids())}
        finally:
            cache.close()
        return {"cache": str(out), "bytes": out.stat().st_size, **info}

    def _run_video_decoder(self, resume: bool) -> dict:
        return self._train("video_decoder", self.s.data, autoencoder=str(self._export("autoencoder")))

    def pretrained_image_ldm(self) -> Path | None:
        """The image LDM shipped for this preset, when the demo also uses the shipped autoencoder it was trained on
        (its card records that autoencoder's sha256); None otherwise (`--from-scratch`, `--train-autoencoder`)."""
        from drivesim.pretrained import model_card, shipped_checkpoint, weights_sha256

        ae = self.pretrained_autoencoder()
        folder = None if self.s.from_scratch or ae is None else shipped_checkpoint("image_ldm", self.s.preset_name)
        if folder is None or model_card(folder).get("autoencoder_sha256") != weights_sha256(ae):
            return None
        return folder

    def _run_image_ldm(self, resume: bool) -> dict:
        shipped = self.pretrained_image_ldm()
        if shipped is None:
            return self._train("image_ldm", self.s.out / "latents.h5")
        from drivesim.configs import to_dict

        def as_dict(cfg):  # the encoder identity is recorded by training, not part of the preset
            return to_dict(dataclasses.replace(cfg, encoder_id=None))

        return self._install_shipped("image_ldm", shipped, as_dict, self.preset.image_ldm, "--from-scratch")

    def _run_prediction(self, resume: bool) -> dict:
        return self._train("prediction", self.s.out / "latents.h5", image_ldm=str(self._export("image_ldm")))

    def _run_interpolation(self, resume: bool) -> dict:
        return self._train("interpolation", self.s.out / "latents.h5", image_ldm=str(self._export("image_ldm")))

    # ---- scenarios, rollouts -------------------------------------------------------------------------------
    def _run_scenarios(self, resume: bool) -> dict:
        from drivesim.datasets import scenario as sc
        from drivesim.datasets.clips import read_annotation, read_manifest

        cfg = self.rollout_config()
        num_frames = self.num_frames(cfg)
        entries = read_manifest(self.s.data).clips
        anns = {"val": [read_annotation(e.annotation) for e in entries if e.split == "val"],
                "train": [read_annotation(e.annotation) for e in entries if e.split == "train"]}
        folder = self.s.out / "scenarios"
        folder.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {"num_frames": num_frames, "fps": cfg.fps}
        for label, night in (("day", 0), ("night", 1)):
            picked, split, relabelled = [a for a in anns["val"] if a.night == night], "val", False
            if not picked:
                picked, split = [a for a in anns["train"] if a.night == night], "train"
            if not picked:  # the dataset has no clip with this label: condition the val boxes on it anyway
                picked, split, relabelled = anns["val"] or anns["train"], "val" if anns["val"] else "train", True
            scen = [sc.Scenario.from_clip(a) for a in picked]
            if relabelled:
                scen = [dataclasses.replace(x, night=night) for x in scen]
            scen = [sc.rescale(sc.resample(x, cfg.fps) if x.fps != cfg.fps else x, cfg.resolution[1], cfg.resolution[0])
                    for x in scen]
            full = sc.extend(scen, num_frames, "chain")
            full = dataclasses.replace(full, source=f"drivesim demo: {label}, {split} clips "
                                       f"{', '.join(a.clip_id for a in picked)} chained to {num_frames} frames"
                                       + (f" (night label set to {night} by the demo)" if relabelled else ""))
            sc.save_scenario(full, folder / f"{label}.json")
            info[label] = {"clips": [a.clip_id for a in picked], "split": split, "relabelled": relabelled,
                           "boxes": sum(len(b) for b in full.frames)}
            self.console.print(f"{folder / (label + '.json')}: {len(picked)} {split} clip(s) chained to "
                               f"{num_frames} frames ({num_frames / cfg.fps / 60:.1f} min at {cfg.fps:g} fps)"
                               + (" [yellow](label set by the demo: no clip has it)[/yellow]" if relabelled else ""),
                               highlight=False)
        return info

    def num_frames(self, cfg) -> int:
        return max(1, round(self.s.rollout_minutes * 60 * cfg.fps))

    def _link_stack(self) -> Path:
        stack = self.s.out / "stack"
        stack.mkdir(parents=True, exist_ok=True)
        for name, stage in (("autoencoder", "video_decoder"), ("image_ldm", "image_ldm"),
                            ("prediction", "prediction"), ("interpolation", "interpolation")):
            link = stack / name
            if link.is_symlink() or link.exists():
                if link.is_symlink() or link.is_file():
                    link.unlink()
                else:
                    shutil.rmtree(link)
            target = self._export(stage).resolve()
            try:
                link.symlink_to(os.path.relpath(target, stack))
            except OSError:  # file systems without symlinks
                shutil.copytree(target, link)
        return stack

    def _run_rollout(self, resume: bool) -> dict:
        import torch

        from drivesim.atomic import atomic_path
        from drivesim.datasets.clips import read_annotation, write_json_atomic, write_manifest
        from drivesim.pipeline.rollout import CLIP_ID, rollout_scenario
        from drivesim.rollout import load_models

        cfg = self.rollout_config()
        num_frames = self.num_frames(cfg)
        stack = self._link_stack()
        grad_was_enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            models = load_models(stack)
            info: dict[str, Any] = {"ckpt_dir": str(stack), "num_frames": num_frames, "fps": cfg.fps,
                                    "steps": cfg.steps, "context_guidance": cfg.context_guidance,
                                    "context_noise_level": cfg.context_noise_level, "config": dataclasses.asdict(cfg)}
            clips_dir = self.s.out / "rollouts" / "clips"
            for k, label in enumerate(("day", "night")):
                out = self.s.out / "rollouts" / label
                done = (out / "manifest.json").is_file()
                again = (out / "state.json").is_file()
                self.console.print(f"rollout {label}: {num_frames} frames ({num_frames / cfg.fps / 60:.1f} min at "
                                   f"{cfg.fps:g} fps, {cfg.steps or 'default'} sampler steps) -> {out}"
                                   + (" (finished earlier)" if done else " (resuming)" if again else ""),
                                   highlight=False)
                t0 = time.monotonic()
                summary = rollout_scenario(self.s.out / "scenarios" / f"{label}.json", models, cfg, out,
                                           self.s.seed + k, num_frames, again, stack,
                                           progress=not (self.s.quiet or self.s.as_json))
                info[label] = {"seconds": round(time.monotonic() - t0, 1), "video": str(out / f"{CLIP_ID}.mp4"),
                               "frames_written": summary.get("frames_written"), "units": summary.get("units"),
                               "resumed_from": summary.get("resumed_from")}
                # the clip-format folder the evaluation and the report read: both rollouts, ids day / night
                clips_dir.mkdir(parents=True, exist_ok=True)
                ann = read_annotation(out / f"{CLIP_ID}.json").to_json()
                ann["id"] = label
                write_json_atomic(clips_dir / f"{label}.json", ann)
                with atomic_path(clips_dir / f"{label}.mp4") as tmp:
                    try:
                        os.link(out / f"{CLIP_ID}.mp4", tmp)
                    except OSError:
                        shutil.copyfile(out / f"{CLIP_ID}.mp4", tmp)
            write_manifest(clips_dir, [("day", "val"), ("night", "val")], source="drivesim demo rollouts",
                           command="drivesim demo", seed=self.s.seed)
        finally:
            torch.set_grad_enabled(grad_was_enabled)
        return info

    # ---- evaluation, report --------------------------------------------------------------------------------
    def _run_eval(self, resume: bool) -> dict:
        from drivesim.errors import WeightsError
        from drivesim.eval.protocols import (
            default_extractors,
            evaluate_videos,
            fvd_over_time,
            list_videos,
            list_windows,
            read_result,
            write_result,
        )

        folder = self.s.out / "eval"
        fake = self.s.out / "rollouts" / "clips"
        boxes = self._box_fidelity(folder, fake)
        try:
            ex = memoized_extractors(default_extractors())
        except WeightsError as e:
            self.console.print(f"[yellow]evaluation skipped:[/yellow] {e}", highlight=False)
            return {"skipped": f"evaluator weights absent: {e}", **boxes}
        real_windows = len(list_windows(list_videos(self.s.data, "val"))[0])
        fake_windows = len(list_windows(list_videos(fake))[0])
        # N is what both sides have at most: all windows (None) when the smaller side has no more than N
        n = self.s.eval_n if self.s.eval_n and self.s.eval_n < min(real_windows, fake_windows) else None
        n_real = self.s.eval_n if self.s.eval_n and self.s.eval_n < real_windows else None
        self.console.print(f"FVD_16 / FID / KVD_16: rollouts (day + night, {fake_windows} windows) vs the val clips "
                           f"of {self.s.data} ({real_windows} windows), N = "
                           f"{n or min(real_windows, fake_windows)} windows per side", highlight=False)
        if resume and (folder / "videos.json").is_file():  # an interrupted eval keeps its finished half
            videos = read_result(folder / "videos.json")
        else:
            videos = evaluate_videos(self.s.data, fake, n=n, num_runs=1, seed=self.s.seed, split="val",
                                     extractors=ex)
            videos["label"] = "demo rollouts (day + night) vs val clips"
            write_result(folder / "videos.json", videos)
        self.console.print(f"FVD over time along the rollouts (pool {self.s.pool})", highlight=False)
        curve = fvd_over_time([fake], self.s.data, pool=self.s.pool, n_real=n_real, seed=self.s.seed,
                              split="val", extractors=ex)
        curve["label"] = "demo rollouts (day + night): FVD over time"
        write_result(folder / "fvd_over_time.json", curve)
        m = videos["metrics"]
        return {"fvd": m["fvd"]["mean"], "fid": m["fid"]["mean"], "kvd": m["kvd"]["mean"], "n": videos["protocol"]["n"],
                "fvd_over_time": curve["curve_points"], "results": [str(folder / "videos.json"),
                                                                    str(folder / "fvd_over_time.json")], **boxes}

    def detector(self) -> Path | None:
        """The reference box detector: `--detector`, else the shipped one trained on this very dataset."""
        from drivesim.pretrained import shipped_detector_for

        return self.s.detector if self.s.detector is not None else shipped_detector_for(self.s.data)

    def _box_fidelity(self, folder: Path, fake: Path) -> dict:
        """Box AP rows, day/night fidelity and frame change of the rollouts (`eval/box_fidelity.json` + a picture);
        {} without a detector for this data."""
        from drivesim.eval.box_fidelity import box_fidelity_rows, fidelity_strip
        from drivesim.eval.protocols import write_result
        from drivesim.training.checkpoint import load_model

        det = self.detector()
        if det is None:
            self.console.print("box fidelity skipped: no reference detector for this dataset (train one with "
                               "`drivesim eval train-detector DATA --out runs/det`, then pass --detector)",
                               highlight=False)
            return {}
        self.console.print(f"box fidelity: detector {det} on the rollouts, val frames and their reconstructions",
                           highlight=False)
        ae = load_model(self._export("autoencoder"))
        record = box_fidelity_rows(det, self.s.data, fake, autoencoder=ae, every=4, seed=self.s.seed)
        write_result(folder / "box_fidelity.json", record)
        from PIL import Image

        strip = fidelity_strip(fake, tuple(record["protocol"]["resolution"]), seed=self.s.seed)
        Image.fromarray(strip).save(folder / "box_fidelity.png")
        ge16 = {k: record["rows"][k]["ge16"]["AP50"] for k in record["rows"]}
        self.console.print("box AP50 (boxes >= 16 px): " + ", ".join(
            f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in ge16.items()), highlight=False)
        return {"box_fidelity": str(folder / "box_fidelity.json"), "box_ap50_ge16": ge16,
                "frame_change_ratio": record["frame_change"]["ratio"]}

    def _run_report(self, resume: bool) -> dict:
        from drivesim.eval.protocols import read_result
        from drivesim.eval.report import build_report

        ev = self.state.stages["eval"]["info"]
        results = [read_result(p) for p in ev.get("results", [])]
        specs = [{"label": "rollouts", "dataset": str(self.s.out / "rollouts" / "clips"), "split": None,
                  "clips": None, "max_clips": 2},
                 {"label": "real val clips", "dataset": str(self.s.data), "split": "val", "clips": None,
                  "max_clips": 2}]
        out = self.s.out / "report.html"
        title = f"drivesim demo report (preset {self.s.preset_name})"
        report = build_report(results, specs, out, title=title)
        from drivesim.pipeline.demo_report import add_demo_section, insert_section

        if ev.get("box_fidelity"):
            from drivesim.eval.report import box_fidelity_section

            record = json.loads(Path(ev["box_fidelity"]).read_text())
            strip = Path(ev["box_fidelity"]).with_suffix(".png")
            insert_section(out, box_fidelity_section(record, strip.read_bytes() if strip.is_file() else None))
            report["box_fidelity"] = record
        run = self.run_record()
        add_demo_section(out, run)
        report["demo"] = run
        from drivesim.datasets.clips import write_json_atomic

        write_json_atomic(out.parent / "report.json", report)
        return {"html": str(out), "json": str(out.parent / "report.json")}

    def run_record(self) -> dict[str, Any]:
        """What produced the numbers: preset, budgets, steps reached, timings (goes into the report)."""
        import torch

        stages = {}
        for name in STEPS:
            rec = self.state.stages.get(name, {})
            stages[name] = {"seconds": rec.get("seconds"), "finished": rec.get("finished"),
                            **{k: v for k, v in rec.get("info", {}).items()
                               if k not in ("fvd_over_time", "config", "results")}}
        return {"preset": self.s.preset_name, "data": str(self.s.data), "seed": self.s.seed,
                "budget_minutes": {n: self.train_cfg(n).max_minutes for n in TRAIN_STEPS},
                "budget_steps": {n: self.train_cfg(n).max_steps for n in TRAIN_STEPS},
                "budget_kind": "wall-clock minutes and steps" if any(self.s.budgets.values()) else "optimizer steps",
                "rollout_minutes": self.s.rollout_minutes, "rollout_settings": self.s.rollout_sets,
                "eval_windows_per_side": self.s.eval_n, "stages": stages,
                "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "cuda": torch.cuda.is_available()},
                "note": (f"Models trained for minutes on {'a GPU' if torch.cuda.is_available() else 'CPU'} with "
                         f"preset {self.s.preset_name}: they are weak, and these numbers measure that stack, not the "
                         "method at paper scale (paper: 512x1024, days of multi-GPU training).")}

    def summary(self) -> dict[str, Any]:
        run = self.run_record()
        run["wall_seconds_this_call"] = round(time.monotonic() - self.t_start, 1)
        run["report"] = str(self.s.out / "report.html")
        run["report_json"] = str(self.s.out / "report.json")
        ev = self.state.stages.get("eval", {}).get("info", {})
        run["metrics"] = {k: ev.get(k) for k in ("fvd", "fid", "kvd", "n")} if not ev.get("skipped") else None
        return run


def to_dict_cfg(cfg) -> dict:
    """An autoencoder config as a dict for comparison: the scale factor (computed from data) and the loss-only
    fields of the image autoencoder (which do not change the network) left out."""
    from drivesim.configs import to_dict

    d = to_dict(cfg)
    for key in ("scale_factor", "box_weight", "kl_weight", "disc_start", "disc_weight", "lpips_weights",
                "lpips_weight", "rec_loss"):
        d.pop(key, None)
    return d


def demo_settings(data: Path = Path("data/sample"), preset: str = "cpu-small", out: Path = Path("runs/demo"), *,
                  from_stage: str | None = None, budget_steps: list[str] | None = None,
                  budgets: list[str] | None = None, rollout_minutes: float | None = None,
                  rollout_sets: list[str] | None = None, eval_n: int | None = None, threads: str = "auto",
                  seed: int = 0, train_autoencoder: bool = False, from_scratch: bool = False,
                  detector: Path | None = None, as_json: bool = False, quiet: bool = False) -> DemoSettings:
    """Checked `DemoSettings` from the options of `drivesim demo` (same names; budgets as "STAGE=N" strings), with
    the preset's defaults (`DEMO_DEFAULTS`, `DEFAULT_STEPS`) filled in.

    Raises:
        ConfigError: unknown preset or stage, a bad budget, rollout length or thread count;
        DataError: `data` is not a clip-format dataset.
    """
    from drivesim.configs import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    if from_stage is not None and from_stage not in STEPS:
        raise ConfigError(f"--from-stage: unknown stage {from_stage!r} (stages: {', '.join(STEPS)})")
    if not (data / "manifest.json").is_file():
        raise DataError(f"{data}: --data: no manifest.json (a clip-format dataset; render the MetaDrive sample "
                        "with: drivesim data simulate --out data/sample --clips 64 --frames 32 --seed 0 --warmup 10)")
    if rollout_minutes is not None and not (math.isfinite(rollout_minutes) and rollout_minutes > 0):
        raise ConfigError(f"--rollout-minutes: must be positive, got {rollout_minutes}")
    if threads != "auto" and not (threads.isdigit() and int(threads) >= 1):
        raise ConfigError(f"--threads: expected a positive integer or auto, got {threads!r}")
    defaults = DEMO_DEFAULTS.get(preset, FALLBACK_DEFAULTS)
    budget_map: dict[str, float | None] = dict(parse_budgets(budgets or []))
    step_map = dict(DEFAULT_STEPS.get(preset, {}))
    step_map.update(parse_budgets(budget_steps or [], "--budget-steps", integer=True))
    settings = DemoSettings(
        data=data, preset_name=preset, out=out, from_stage=from_stage, budgets=budget_map,
        rollout_minutes=rollout_minutes if rollout_minutes is not None else defaults["rollout_minutes"],
        rollout_sets=list(rollout_sets) if rollout_sets else list(defaults["rollout_sets"]),
        eval_n=eval_n if eval_n is not None else defaults["eval_n"], pool=defaults["pool"], seed=seed,
        quiet=quiet, as_json=as_json, estimate_min=defaults["estimate_min"],
        threads=None if threads == "auto" else int(threads),
        train_autoencoder=train_autoencoder or from_scratch, from_scratch=from_scratch, steps=step_map,
        detector=detector)
    return settings


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run (or continue) the demo described by `settings`: every stage of `STEPS` that is not finished with the
    same config, then the report. Returns the summary (stages, metrics, report paths)."""
    return Demo(settings).run()
