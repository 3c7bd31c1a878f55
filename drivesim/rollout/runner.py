"""The streamed, resumable rollout runner (`Rollout`): units of key frames -> x4 -> x4 -> decode -> segments, with
its state committed atomically after every unit (the design is described in `drivesim.rollout`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from drivesim.configs import to_dict
from drivesim.errors import CheckpointError, ConfigError, WriteError
from drivesim.rollout.config import FACTOR, STATE_VERSION, RolloutConfig, check_rollout_config
from drivesim.rollout.plan import crossfade_window, make_plan, to_uint8, unit_generator
from drivesim.rollout.stack import RolloutModels
from drivesim.types import Conditioning

CondFn = Callable[[list[int]], Conditioning]
"""Conditioning of output-rate latent frames at the given indices: boxes (1, len, n, 4) etc., b = 1. For per-frame
latents these are the output frames; on 3D latents latent frame j stands for video frames f j .. f j + f - 1 and its
boxes are theirs reduced as the training cache reduced them (`drivesim.pipeline.rollout.make_cond_fn`)."""
SegmentWriter = Callable[[Path, np.ndarray, float], None]
"""(path, frames (t, h, w, 3) uint8, fps) -> writes a closed, playable mp4 atomically."""


def _atomic_write(path: Path, tmp: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)`, then rename it to `path`. A failed write (full or read-only disk) removes `tmp` and raises one
    WriteError naming `path`; the state committed before stays the one a resume reads."""
    from safetensors import SafetensorError

    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).removeprefix(
            "Error while serializing: ")
        raise WriteError(f"{path}: write: {reason}; nothing was written") from None
    except BaseException:  # Ctrl-C, SIGTERM (a KeyboardInterrupt in the CLI), any other failure
        tmp.unlink(missing_ok=True)
        raise


def _atomic_json(path: Path, data: Any) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, path.with_name(f".{path.name}.tmp"), write)


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, path.with_name(f".{path.stem}.tmp.npy"), lambda tmp: np.save(tmp, array))


class Rollout:
    """One streamed, resumable rollout into `out_dir` (see the module docstring).

    Args:
        models: `RolloutModels`.
        cfg: `RolloutConfig`.
        cond_fn: output-rate latent-frame indices -> `Conditioning` (b = 1) of those latent frames (`CondFn`).
        num_frames: output (video) frames N.
        out_dir: folder for latents/, segments/, state.json, state-<n>.safetensors.
        seed: rollout seed.
        segment_writer: writes one segment mp4 (e.g. `drivesim.datasets.clips.write_video`).
        resolution: (h, w) of the decoded frames (before upsampling).
        progress: optional callback (units done, units total, frames written).
    """

    def __init__(self, models: RolloutModels, cfg: RolloutConfig, cond_fn: CondFn, num_frames: int,
                 out_dir: str | Path, seed: int, segment_writer: SegmentWriter, resolution: tuple[int, int],
                 progress: Callable[[int, int, int], None] | None = None):
        check_rollout_config(cfg)
        if cfg.upsample and models.upsampler is None:
            raise ConfigError("rollout config: upsample: true needs an upsampler checkpoint (D/upsampler)")
        self.models, self.cfg, self.cond_fn, self.seed = models, cfg, cond_fn, int(seed)
        self.plan = make_plan(models, cfg, num_frames, resolution)
        self.out = Path(out_dir)
        self.segment_writer = segment_writer
        self.progress = progress
        self.config_hash = hashlib.sha256(json.dumps(
            {"config": to_dict(cfg), "seed": self.seed, "num_frames": num_frames, "resolution": list(resolution),
             "models": models.fingerprint, "state_version": STATE_VERSION}, sort_keys=True).encode()).hexdigest()
        self.stats = {"units_run": 0, "seconds": 0.0}
        self._reset()

    # -- state -----------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        z = torch.zeros((0, 4, *self.plan.latent_size))
        self.unit = 0  # next unit to run
        self.keys = z.clone()  # key latents [keys_base, keys_base + len)
        self.keys_base = 0
        self.keys_done = 0  # key frames generated
        self.interp_key = 0  # first key frame of the next interpolation group
        self.latents = z.clone()  # output-rate latents [lat_base, lat_base + len)
        self.lat_base = 0
        self.lat_done = 0  # output-rate latents produced
        self.window = 0  # next decode window
        self.partial = None  # cross-fade partial sums of frames [final, window end)
        self.partial_w = torch.zeros(0, dtype=torch.float64)
        self.final = 0  # decoded frames final (emitted)
        self.up_pending = None  # decoded frames waiting for a full upsampler chunk
        self.frames_written = 0
        self.segments: list[str] = []
        self.state_seq = 0  # number of the last state written (its tensors file is state-<seq>.safetensors)

    @property
    def state_path(self) -> Path:
        return self.out / "state.json"

    def _save_state(self) -> None:
        from safetensors.torch import save_file

        tensors = {"keys": self.keys.contiguous(), "latents": self.latents.contiguous(),
                   "partial_w": self.partial_w.contiguous()}
        if self.partial is not None:
            tensors["partial"] = self.partial.contiguous()
        if self.up_pending is not None:
            tensors["up_pending"] = self.up_pending.contiguous()
        # the state is one unit: a new tensors file under a new name, then state.json naming it (one atomic rename),
        # then the old tensors file goes. A kill between the two writes leaves state.json naming the previous,
        # still present tensors file: the resume repeats one unit (overwriting one file in place made that gap a
        # state no resume could read)
        self.state_seq += 1
        name = f"state-{self.state_seq:06d}.safetensors"
        _atomic_write(self.out / name, self.out / f".{name}.tmp", lambda tmp: save_file(tensors, str(tmp)))
        meta = {"state_version": STATE_VERSION, "config_hash": self.config_hash, "seed": self.seed,
                "rng": "torch.Generator per unit, seeded from numpy SeedSequence([seed, unit])",
                "unit": self.unit, "num_units": self.plan.num_units, "keys_base": self.keys_base,
                "keys_done": self.keys_done, "interp_key": self.interp_key, "lat_base": self.lat_base,
                "lat_done": self.lat_done, "window": self.window, "final": self.final,
                "frames_written": self.frames_written, "segments": self.segments,
                "tensors_file": name, "state_seq": self.state_seq,
                "tensors_sha256": hashlib.sha256((self.out / name).read_bytes()).hexdigest(),
                "complete": self.done}
        _atomic_json(self.state_path, meta)
        for stale in self.out.glob("state*.safetensors"):
            if stale.name != name:
                stale.unlink()

    def _load_state(self) -> None:
        from safetensors.torch import load_file

        try:
            meta = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.state_path}: state: unreadable ({e})") from None
        if meta.get("config_hash") != self.config_hash:
            raise ConfigError(f"{self.state_path}: config_hash: the rollout was started with another config, "
                              "seed, length or checkpoints; resume with the same ones (or use a new --out)")
        blob = self.out / str(meta.get("tensors_file", "state.safetensors"))
        if blob.parent != self.out or not blob.is_file():
            raise CheckpointError(f"{self.state_path}: tensors_file: {blob.name} is missing")
        if hashlib.sha256(blob.read_bytes()).hexdigest() != meta.get("tensors_sha256"):
            raise CheckpointError(f"{blob}: tensors_sha256: does not match state.json")
        self.state_seq = int(meta.get("state_seq", 0))
        t = load_file(str(blob))
        self.keys, self.latents, self.partial_w = t["keys"], t["latents"], t["partial_w"]
        self.partial, self.up_pending = t.get("partial"), t.get("up_pending")
        for k in ("unit", "keys_base", "keys_done", "interp_key", "lat_base", "lat_done", "window", "final",
                  "frames_written", "segments"):
            setattr(self, k, meta[k])

    @property
    def done(self) -> bool:
        return self.final >= self.plan.num_frames and self.up_pending is None

    # -- work ------------------------------------------------------------------------------------------------
    def _sample_kwargs(self, gen: torch.Generator) -> dict:
        c = self.cfg
        return dict(steps=c.steps, sampler=c.sampler, guidance_scale=c.label_guidance,
                    context_guidance=c.context_guidance, context_noise_level=c.context_noise_level, generator=gen)

    def _add_keys(self, new: torch.Tensor) -> None:
        new = new[: self.plan.num_keys - self.keys_done]  # the last clip may run past the last key frame
        self.keys = torch.cat([self.keys, new.cpu()])
        self.keys_done += new.shape[0]

    def _key(self, k: int) -> torch.Tensor:
        return self.keys[k - self.keys_base]

    def _predict_keys(self, gen: torch.Generator) -> None:
        plan, m = self.plan, self.models
        if self.unit == 0 and plan.image_key:
            cond = self.cond_fn([0])
            z = m.image_ldm.sample(cond, plan.latent_size, steps=self.cfg.steps, sampler=self.cfg.sampler,
                                   guidance_scale=self.cfg.label_guidance, generator=gen)
            self._add_keys(z[0].float())
            return
        # on 3D latents the first clip has no context (S = 0: the unconditional model, LVDM's first clip)
        s = min(plan.context_first if self.unit == plan.first_clip_unit else plan.context_later, self.keys_done)
        start = self.keys_done - s
        cond = self.cond_fn(plan.key_positions(start, plan.clip_length))
        context = self.keys[start - self.keys_base:self.keys_done - self.keys_base][None]
        z = m.prediction.predict(cond, context, **self._sample_kwargs(gen))
        self._add_keys(z[0, s:].float())

    def _interpolate(self, gen: torch.Generator) -> None:
        """Interpolate every complete group of window_keys key frames; append output-rate latents."""
        plan = self.plan
        mk = plan.window_keys - 1
        if plan.num_keys == 1:
            if self.keys_done and self.lat_done == 0:
                self._append_latents(self._key(0)[None])
            return
        while self.interp_key + mk < self.keys_done:
            a = self.interp_key
            frames = torch.stack([self._key(k) for k in range(a, a + mk + 1)])
            spacing = plan.key_spacing
            for stage in plan.stages:
                spacing //= FACTOR
                out = []
                for g in range(0, frames.shape[0] - 1, mk):  # windows of mk + 1 frames, sharing end frames
                    base = a * plan.key_spacing + g * spacing * FACTOR
                    idx = [base + j * spacing for j in range(FACTOR * mk + 1)]
                    z = self.models.interpolation.interpolate(self.cond_fn(idx), frames[g:g + mk + 1][None], stage,
                                                              **self._sample_kwargs(gen))[0].float().cpu()
                    out.append(z if not out else z[1:])
                frames = torch.cat(out)
            last = self.interp_key + mk == plan.num_keys - 1
            self._append_latents(frames if last else frames[:-1])
            self.interp_key += mk
        # key frames before interp_key are no longer needed (the last one of a group starts the next group)
        keep_from = min(self.interp_key, max(0, self.keys_done - plan.context_later))
        self.keys = self.keys[keep_from - self.keys_base:]
        self.keys_base = keep_from

    def _append_latents(self, z: torch.Tensor) -> None:
        z = z[: self.plan.num_latents - self.lat_done]
        self.latents = torch.cat([self.latents, z])
        self.lat_done += z.shape[0]
        self._new_latents.append(z)

    def _decode(self) -> torch.Tensor | None:
        """Decode every window whose latents are complete; return the newly final frames (t, 3, h, w).

        Windows count latent frames; window [s, e) decodes to video frames [f s, f e) (f = `frames_per_latent`),
        blended over the video frames as `AutoencoderKL.decode` blends its chunks; frames past N are not emitted."""
        plan, ae = self.plan, self.models.autoencoder
        windows, f = plan.decode_windows, plan.frames_per_latent
        out = []
        while self.window < len(windows) and windows[self.window][1] <= self.lat_done:
            s, e = windows[self.window]
            lat = self.latents[s - self.lat_base:e - self.lat_base][None].to(next(ae.parameters()).device)
            rec = ae.decode_scaled(lat, num_frames=e - s)[0].float().cpu()
            w = crossfade_window(windows, self.window, f)
            # partial sums cover video frames [final, ...); extend to this window's end
            if self.partial is None:
                self.partial = torch.zeros((0, *rec.shape[1:]))
            need = f * e - self.final - self.partial.shape[0]
            if need > 0:
                self.partial = torch.cat([self.partial, torch.zeros((need, *rec.shape[1:]))])
                self.partial_w = torch.cat([self.partial_w, torch.zeros(need, dtype=torch.float64)])
            lo = f * s - self.final
            self.partial[lo:lo + f * (e - s)] += rec * rearrange(w.float(), "t -> t 1 1 1")
            self.partial_w[lo:lo + f * (e - s)] += w
            self.window += 1
            next_start = windows[self.window][0] if self.window < len(windows) else plan.num_latents
            upto = min(f * next_start, plan.num_frames)
            n = upto - self.final
            if n > 0:
                done = self.partial[:n] / rearrange(self.partial_w[:n].float(), "t -> t 1 1 1")
                out.append(done)
                self.partial, self.partial_w = self.partial[n:], self.partial_w[n:]
                self.final = upto
            # latents before the next window's start are decoded for good
            drop = min(next_start, self.lat_done) - self.lat_base
            if drop > 0:
                self.latents = self.latents[drop:]
                self.lat_base += drop
        return torch.cat(out) if out else None

    def _upsample(self, frames: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor | None:
        if not self.cfg.upsample:
            return frames
        up = self.models.upsampler
        chunk = self.cfg.upsample_chunk_frames or up.config.chunk_frames
        pending = frames if self.up_pending is None else (
            self.up_pending if frames is None else torch.cat([self.up_pending, frames]))
        if pending is None:
            return None
        last = self.final >= self.plan.num_frames
        n = pending.shape[0] if last else (pending.shape[0] // chunk) * chunk
        self.up_pending = pending[n:] if n < pending.shape[0] else None
        if n == 0:
            return None
        return up.upsample(pending[:n][None], noise_level=self.cfg.upsample_noise_level, steps=self.cfg.steps,
                           sampler=self.cfg.sampler, chunk_frames=chunk, generator=gen)[0].float().cpu()

    def _run_unit(self) -> None:
        u = self.unit
        gen = unit_generator(self.seed, u)
        self._new_latents: list[torch.Tensor] = []
        keys_before = self.keys_done
        if self.keys_done < self.plan.num_keys:
            self._predict_keys(gen)
        new_keys = self.keys[keys_before - self.keys_base:]
        self._interpolate(gen)
        frames = self._upsample(self._decode(), gen)
        lat_dir, seg_dir = self.out / "latents", self.out / "segments"
        if new_keys.shape[0]:
            _atomic_npy(lat_dir / f"keys_{u:06d}.npy", new_keys.numpy())
        if self._new_latents:
            _atomic_npy(lat_dir / f"frames_{u:06d}.npy", torch.cat(self._new_latents).numpy())
        if frames is not None and frames.shape[0]:
            name = f"seg_{u:06d}.mp4"
            self.segment_writer(seg_dir / name, to_uint8(frames), self.cfg.fps)
            self.segments.append(name)
            self.frames_written += frames.shape[0]
        self.unit += 1
        self._save_state()

    # what a SIGKILL (which no handler can clean up after) leaves next to the rollout's files: the temp names of our
    # writers (`drivesim.atomic`, `_atomic_write`) are the output's name behind a dot; the outputs never start with one
    TEMP_PREFIXES = (".state", ".rollout", ".scenario.json", ".manifest.json")

    def _sweep_temp_files(self) -> None:
        """Remove temp files a killed run left directly in `out_dir` (the unit folders are swept by `run`)."""
        for f in self.out.iterdir():
            if f.is_file() and f.name.startswith(self.TEMP_PREFIXES):
                f.unlink(missing_ok=True)

    def run(self, resume: bool = False, max_units: int | None = None) -> dict:
        """Run (or continue) the rollout until every frame is written (or `max_units` units ran).

        Returns:
            summary dict: frames_written, segments, units, seconds, resumed_from (unit), complete.
        Raises:
            ConfigError: `out_dir` holds a rollout state but `resume` is False, or the state is of another config.
        """
        resumed_from = 0
        if self.state_path.is_file():  # before any folder is made: a refused resume leaves `out_dir` as it was
            if not resume:
                raise ConfigError(f"{self.state_path}: state: a rollout was already started here; pass --resume to "
                                  "continue it, or choose another --out")
            self._load_state()
            resumed_from = self.unit
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "latents").mkdir(exist_ok=True)
        (self.out / "segments").mkdir(exist_ok=True)
        if resumed_from:
            self._sweep_temp_files()
        # files of units after the saved state were written by a killed run: they are regenerated
        for folder in ("latents", "segments"):
            for f in (self.out / folder).iterdir():
                stem = f.stem.split("_")[-1].split(".")[0]
                if f.name.startswith(".") or (stem.isdigit() and int(stem) >= self.unit):
                    f.unlink()
        t0 = time.perf_counter()
        ran = 0
        while not self.done and (max_units is None or ran < max_units):
            self._run_unit()
            ran += 1
            if self.progress:
                self.progress(self.unit, self.plan.num_units, self.frames_written)
        self.stats = {"units_run": ran, "seconds": time.perf_counter() - t0}
        return {"frames_written": self.frames_written, "segments": len(self.segments), "units": self.unit,
                "num_units": self.plan.num_units, "seconds": self.stats["seconds"], "resumed_from": resumed_from,
                "complete": self.done}
