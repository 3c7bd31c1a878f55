"""The demo's stage bodies: what each of `drivesim.pipeline.demo.STEPS` does (train, install a shipped checkpoint,
encode, build scenarios, roll out, evaluate, write the report). `Demo` runs them in order."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from drivesim.errors import ConfigError
from drivesim.pipeline.outputs import shown_path


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


def to_dict_cfg(cfg) -> dict:
    """An autoencoder config as a dict for comparison: the scale factor (computed from data) and the training-only
    fields of the image autoencoder (loss terms, `decoder_only`: they do not change the network) left out."""
    from drivesim.configs import to_dict

    d = to_dict(cfg)
    for key in ("scale_factor", "box_weight", "kl_weight", "disc_start", "disc_weight", "lpips_weights",
                "lpips_weight", "rec_loss", "decoder_only"):
        d.pop(key, None)
    return d


class DemoStages:
    """Mixin of `drivesim.pipeline.demo.Demo`: one `_run_<stage>(resume) -> info` per stage; reads the demo's
    settings `self.s`, preset `self.preset`, console `self.console` and `self.state`."""

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
        steps = card.get("total_steps", card.get("steps"))  # a fine-tuned checkpoint: all its steps
        self.console.print(f"{name}: the pretrained {shipped.name} ({steps} steps; "
                           f"{card.get('summary', '')}) -> {export}  ({flag} trains one instead)", highlight=False)
        return {"export": str(export), "weights": "pretrained", "pretrained": shown_path(shipped),
                "sha256": weights_sha256(shipped), "steps": steps, "stop_reason": "shipped",
                "batch_size": card.get("batch_size"), "max_steps": steps, "budget_minutes": None,
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
        """The image LDM shipped for this preset, when the demo also uses the shipped autoencoder whose latents it
        was trained on (its config's `encoder_id` is that autoencoder's encoder identity: a decoder-only fine-tune
        of the autoencoder keeps it); None otherwise (`--from-scratch`, `--train-autoencoder`)."""
        from drivesim.autoencoder.model import encoder_id
        from drivesim.pretrained import shipped_checkpoint
        from drivesim.training.checkpoint import load_model, read_header

        ae = self.pretrained_autoencoder()
        folder = None if self.s.from_scratch or ae is None else shipped_checkpoint("image_ldm", self.s.preset_name)
        if folder is None:
            return None
        trained_on = read_header(folder)[0]["config"].get("encoder_id")
        if trained_on != encoder_id(*load_model(ae, "autoencoder_kl").encoder_fingerprint()):
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
        record["protocol"]["detector"] = shown_path(det)
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
