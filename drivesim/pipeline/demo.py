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
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from drivesim.errors import ConfigError, DataError
from drivesim.pipeline.demo_stages import DemoStages, to_dict_cfg  # noqa: F401  (to_dict_cfg: re-exported)
from drivesim.pipeline.demo_state import (  # noqa: F401  (re-exported: the stage list and the budget parser)
    STEPS,
    TRAIN_STEPS,
    DemoState,
    _now,
    _sha,
    data_fingerprint,
    parse_budgets,
)

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


class Demo(DemoStages):
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
