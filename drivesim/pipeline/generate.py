"""Generating a labelled synthetic dataset (`drivesim generate`): box tracks of real clips (or scenario files),
augmented, rolled out by a trained stack, written as a clip-format dataset.

Clip k of N takes source k mod S (cycling over the S source clips in manifest / file order), its own seed
`clip_seed(seed, k)`, applies the augmentations (`drivesim.datasets.augment`, seeded by that clip seed) to the
source's tracks, and is rolled out by `drivesim.pipeline.rollout.rollout_scenario` (the same resumable rollout as
`drivesim rollout`). Its labels are the augmented scenario at the output frame rate and resolution: the boxes
the video was conditioned on (a box beyond the model's max_boxes is marked "conditioned": false).

Output::

    OUT/
      manifest.json             clip format; written once, last, by the main process (RANK 0) when every clip is
                                done. Top level: command, seed, "generate" (the run: source and its sha256, the
                                stack's checkpoint sha256s, rollout config, augmentations, run hash); each clip
                                row adds source_clip, seed, num_frames, augmentations (what was applied)
      gen_000000.mp4 / .json    one clip per sample (H.264; clip-format annotation), split = the source clip's
      .generate/                bookkeeping of an unfinished run (removed when the manifest is written)
        run.json                what decides the outputs; a rerun must match it (a mismatch is refused)
        done/<id>.json          written after a clip's mp4 and json: its manifest row and file sizes
        failed-<rank>.json      a process that failed (the main process stops waiting and says so)
        work/<id>/              the rollout of a clip in progress (its resume state)

Resume: rerunning the same command continues: finished clips are kept (their done records), a clip in progress
resumes its rollout, so the dataset equals an uninterrupted run's (same annotation bytes, same video frames).

Processes: under `accelerate launch` / torchrun, process RANK of WORLD_SIZE makes clips RANK, RANK + W, ...
(`drivesim.rollout.shard`) on its own device (cuda -> cuda:LOCAL_RANK); the outputs do not depend on W. The
main process then waits for every clip's done record and writes the manifest; if it stopped early, rerunning
it (any W) completes the dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drivesim.datasets.augment import Augmentations, augment
from drivesim.datasets.clips import SPLITS, read_annotation, read_manifest, write_json_atomic
from drivesim.datasets.scenario import Scenario, load_scenario, save_scenario
from drivesim.errors import CheckpointError, ConfigError, DataError
from drivesim.pipeline.generate_run import RunFolder, ShardFailed
from drivesim.pipeline.outputs import check_output, shown_path, undo_unless_resumable

__all__ = ["Augmentations", "ShardFailed", "clip_seed", "generate_dataset", "load_sources"]

GENERATE_VERSION = 1  # part of the run identity: a change of what a run writes bumps it
MAX_CLIPS = 1_000_000


@dataclass(frozen=True)
class Source:
    """One source of box tracks: a dataset clip (`name` = its clip id) or a scenario file (`name` = its file name).

    Attributes:
        split: the split its generated clips get ("train" for scenario files, which have none).
        scenario: its tracks, at its own frame rate, in its own pixel frame.
    """

    name: str
    split: str
    scenario: Scenario


@dataclass(frozen=True)
class Job:
    """One clip to generate: clip k of the run."""

    index: int
    clip_id: str
    source: int  # index into the sources
    seed: int


def clip_id(k: int) -> str:
    return f"gen_{k:06d}"


def clip_seed(seed: int, k: int) -> int:
    """The seed of clip k of a run with `seed`: 53 bits from numpy's SeedSequence([seed, k]) (exact in any JSON
    reader), so runs with nearby seeds share no clip seed (seed + k would: run 0's clip 1 = run 1's clip 0)."""
    a, b = np.random.SeedSequence([int(seed), int(k)]).generate_state(2, dtype=np.uint32)
    return (int(a) << 21) | (int(b) >> 11)


def load_sources(paths: list[Path], split: str = "all") -> tuple[list[Source], dict[str, Any]]:
    """The sources named on the command line: one clip-format dataset folder (its clips in manifest order, those
    of `split`), or scenario files and folders of them (each folder's *.json, sorted).

    Returns:
        (sources, record): record {"kind": "dataset" | "scenarios", "paths", "sha256"} (sha256 over the sources'
        names, splits and tracks: what a resumed run must find unchanged).

    Raises:
        ConfigError: a bad `split`, a dataset given with other sources, --split with scenario files.
        DataError: a missing path, an invalid manifest / annotation / scenario, no source clip at all.
    """
    if split not in (*SPLITS, "all"):
        raise ConfigError(f"--split: expected one of train, val, all, got {split!r}")
    if not paths:
        raise ConfigError("SOURCE: give a clip-format dataset folder or scenario files")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: SOURCE: not found")
    datasets = [p for p in paths if p.is_dir() and (p / "manifest.json").exists()]
    if datasets:
        if len(paths) > 1:
            raise ConfigError(f"{datasets[0]}: SOURCE: a dataset folder is given alone (not with other sources)")
        manifest = read_manifest(datasets[0])
        entries = [e for e in manifest.clips if split == "all" or e.split == split]
        if not entries:
            raise DataError(f"{datasets[0]}: --split {split}: the dataset has no {split} clips")
        sources = [Source(e.clip_id, e.split, Scenario.from_clip(read_annotation(e.annotation))) for e in entries]
        kind = "dataset"
    else:
        if split != "all":
            raise ConfigError(f"--split: selects clips of a dataset; scenario files have no split (their clips are "
                              f"written as train), got --split {split}")
        files: list[Path] = []
        for p in paths:
            found = sorted(p.glob("*.json")) if p.is_dir() else [p]
            if not found:
                raise DataError(f"{p}: SOURCE: no manifest.json and no *.json scenario files")
            files += found
        sources = [Source(f.name, "train", load_scenario(f)) for f in files]
        kind = "scenarios"
    h = hashlib.sha256()
    for s in sources:
        h.update(json.dumps([s.name, s.split, s.scenario.to_json()], sort_keys=True).encode())
    return sources, {"kind": kind, "paths": [shown_path(p) for p in paths], "sha256": h.hexdigest()}


def source_frames(scenario: Scenario, fps: float, time_shift: int) -> int:
    """Frames a clip of `scenario` has at `fps` after starting `time_shift` source frames later (the resampled
    length of `drivesim.datasets.scenario.resample`): the default --frames."""
    n = scenario.num_frames - time_shift
    return n if scenario.fps == fps else max(1, int(np.floor(n * fps / scenario.fps + 0.5)))


def generate_dataset(sources: list[Path], stack: Path, out: Path, *, clips: int | None = None,
                     frames: int | None = None, seed: int = 0, steps: int | None = None,
                     augmentations: Augmentations = Augmentations(), split: str = "all", cfg=None,
                     device: str = "cpu", command: str = "drivesim generate", progress: bool = True,
                     log: Callable[[str], None] = print, max_clips: int | None = None,
                     poll_s: float = 1.0) -> dict[str, Any]:
    """Generate `clips` labelled clips from `sources` with the stack `stack` into the clip-format folder `out`
    (layout, resume and multi-process behaviour in the module docstring).

    Args:
        sources: one dataset folder, or scenario files / folders (`load_sources`).
        stack: D/{autoencoder,image_ldm,prediction,interpolation[,upsampler]} (as `drivesim rollout --ckpt-dir`).
        clips: clips to make, cycling over the sources; None: one per source clip.
        frames: output frames per clip; None: each source's length (after the time shift) at the output rate. A
            longer clip replays its source (track ids offset per replay).
        seed: run seed (>= 0); clip k uses `clip_seed(seed, k)` for its noise and augmentations.
        steps: sampler steps of every model call (None: the rollout config's / each model's default).
        augmentations: applied to every clip's source tracks (into the labels).
        split: "train", "val" or "all" clips of a dataset source.
        cfg: RolloutConfig (`drivesim.pipeline.rollout.resolve_config`); None: the defaults.
        device: "cpu", "cuda" (cuda:LOCAL_RANK under a launcher) or an explicit device.
        command: recorded in the manifest.
        max_clips: stop after making this many clips in this call (tests, budgets): the run stays resumable.
        poll_s: how often the main process looks for the other processes' done records.

    Returns:
        {"out", "clips" (N), "done" (clips finished, all processes), "made" (by this call), "kept" (this process's
        clips already finished before), "rank", "world_size", "complete" (the manifest is written), "seconds"}.

    Raises:
        ConfigError: a bad option (named), an `out` over the source, an `out` holding other files or a run of
            other settings; DataError: bad or empty sources, a source size the autoencoder cannot take;
            CheckpointError: a missing or inconsistent stack; ShardFailed: another process failed (main process).
    """
    from drivesim.configs import to_dict
    from drivesim.rollout import checkpoint_sha256s, load_models, process_device, resolve_fps, shard

    t0 = time.time()
    cfg = _check_options(clips, frames, steps, seed, augmentations, cfg)
    out, stack = Path(out), Path(stack)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    srcs, source_record = load_sources(list(sources), split)
    for p in [*sources, stack]:  # only the input check: an existing `out` is a run to continue (RunFolder.state)
        check_output(out, {"--stack" if p is stack else "SOURCE": Path(p)}, overwrite=True)
    num_clips = clips if clips is not None else len(srcs)
    _check_sources(srcs[:num_clips], augmentations, cfg)
    if not stack.is_dir():
        raise CheckpointError(f"{stack}: --stack: folder not found")

    with torch.no_grad():
        models = load_models(stack, upsample=cfg.upsample, device=process_device(device))
        cfg = resolve_fps(cfg, models, "--set fps")
        identity = {"version": GENERATE_VERSION, "source_sha256": source_record["sha256"], "split": split,
                    "checkpoints": checkpoint_sha256s(stack, cfg.upsample), "rollout_config": to_dict(cfg),
                    "clips": num_clips, "frames": frames, "seed": seed, "augmentations": augmentations.to_json()}
        folder = RunFolder(out, hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(), identity)
        jobs = [Job(k, clip_id(k), k % len(srcs), clip_seed(seed, k)) for k in range(num_clips)]
        ids = [j.clip_id for j in jobs]
        summary = {"out": str(out), "clips": num_clips, "made": 0, "kept": 0, "rank": rank, "world_size": world}
        if folder.state() == "complete":
            return summary | {"done": num_clips, "complete": True, "seconds": time.time() - t0}
        mine = shard(jobs, rank, world)
        pending = [j for j in mine if not folder.is_done(j.clip_id)]
        summary["kept"] = len(mine) - len(pending)
        if not pending and rank != 0:  # nothing to write: touch nothing (the main process may be finishing)
            return summary | {"done": folder.count_done(ids), "complete": False, "seconds": time.time() - t0}
        where = {"source": {k: v for k, v in source_record.items() if k != "sha256"}, "stack": shown_path(stack)}
        meta = {"source": "drivesim generate", "command": command, "seed": seed,
                "generate": {"run": folder.run, **identity, **where, "fps": cfg.fps}}
        bar = _Bar(progress, rank, world, len(jobs) if rank == 0 else len(mine))
        # one process: a run that fails before it has anything to resume from is undone (a new `out` goes with
        # it); several share the folder: a failure leaves it to the rerun
        guard = undo_unless_resumable(out, folder.resumable) if world == 1 else contextlib.nullcontext()
        stopped = False
        try:
            with guard:
                folder.start(rank, world)
                bar.start(folder.count_done(ids) if rank == 0 else summary["kept"])
                for job in pending:
                    if max_clips is not None and summary["made"] >= max_clips:
                        stopped = True
                        break
                    _make_clip(job, folder, srcs[job.source], models, cfg, stack, frames, augmentations)
                    summary["made"] += 1
                    bar.update(folder.count_done(ids) if rank == 0 else summary["kept"] + summary["made"])
                if rank == 0 and not stopped:
                    folder.wait_for(ids, t0, world, bar.update, log, poll_s)
                    folder.finish(ids, meta)
        except BaseException as e:
            if rank != 0:
                folder.record_failure(rank, e)
            raise
        finally:
            bar.stop()
    complete = rank == 0 and not stopped
    done = num_clips if complete else folder.count_done(ids)
    return summary | {"done": done, "complete": complete, "seconds": time.time() - t0}


def _check_options(clips, frames, steps, seed, augmentations: Augmentations, cfg):
    """The rollout config with `steps` in it, after refusing a bad option (ConfigError naming the flag)."""
    import dataclasses

    from drivesim.rollout import RolloutConfig, check_rollout_config, check_rollout_length

    for name, value in (("--clips", clips), ("--frames", frames), ("--steps", steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if clips is not None and clips > MAX_CLIPS:
        raise ConfigError(f"--clips: {clips} exceeds the limit of {MAX_CLIPS} clips per run")
    if seed < 0:
        raise ConfigError(f"--seed: must be >= 0, got {seed}")
    check_rollout_length(frames=frames)
    augmentations.check()
    cfg = cfg if cfg is not None else RolloutConfig()
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    check_rollout_config(cfg, "--set")
    return cfg


def _check_sources(used: list[Source], augmentations: Augmentations, cfg) -> None:
    """Refuse, before anything is written, a source the run cannot use: a time shift past its end, a pixel size
    the autoencoder cannot take (no --set resolution)."""
    for src in used:
        s = src.scenario
        if augmentations.time_shift >= s.num_frames:
            raise ConfigError(f"--time-shift: {augmentations.time_shift} frames leaves nothing of source clip "
                              f"{src.name} ({s.num_frames} frames)")
        if cfg.resolution is None and (s.width % 8 or s.height % 8):
            raise DataError(f"{src.name}: width/height: {s.width}x{s.height} is not a multiple of 8; set "
                            "--set resolution=[h,w]")


def _make_clip(job: Job, folder: RunFolder, src: Source, models, cfg, stack: Path, frames: int | None,
               aug: Augmentations) -> None:
    """Roll out clip `job` in .generate/work/<id>/ (resuming it if a killed run started it), then put its mp4 and
    labels in the output folder and, last, its done record."""
    from drivesim.atomic import write_bytes_atomic
    from drivesim.pipeline.rollout import rollout_scenario

    scenario, applied = augment(src.scenario, aug, job.seed)
    scen_path = folder.work / f"{job.clip_id}.scenario.json"
    save_scenario(scenario, scen_path)
    num_frames = frames if frames is not None else source_frames(src.scenario, cfg.fps, aug.time_shift)
    rollout_dir = folder.work / job.clip_id
    result = rollout_scenario(scen_path, models, cfg, rollout_dir, job.seed, num_frames, resume=True,
                              ckpt_dir=stack, progress=False)
    ann = read_annotation(rollout_dir / "rollout.json")
    ann.clip_id = job.clip_id
    ann.source = (f"drivesim generate: source clip {src.name}, seed {job.seed}"
                  + (f", {', '.join(applied)}" if applied else ""))
    write_bytes_atomic(folder.out / f"{job.clip_id}.mp4", (rollout_dir / "rollout.mp4").read_bytes())
    write_json_atomic(folder.out / f"{job.clip_id}.json", ann.to_json())
    folder.mark_done(job.clip_id, job.index, src.split,
                     {"source_clip": src.name, "seed": job.seed, "num_frames": num_frames, "augmentations": applied,
                      "unconditioned_boxes": result["unconditioned_boxes"]["boxes"]})
    shutil.rmtree(rollout_dir, ignore_errors=True)
    scen_path.unlink(missing_ok=True)


class _Bar:
    """A rich progress bar over clips with an ETA (nothing when `enabled` is False)."""

    def __init__(self, enabled: bool, rank: int, world: int, total: int):
        self.bar = self.task = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        label = "generate" if world == 1 else f"generate [process {rank}/{world}]"
        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("clips"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self.total = total

    def start(self, done: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task("generate", total=self.total, completed=done)
            self.bar.start()

    def update(self, done: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=done)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
