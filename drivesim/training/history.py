"""What a resumed run may change in its training config, and the run's append-only history.

A resume continues the optimisation the checkpoint holds; a new learning rate, batch size or schedule would
silently make it another run. So `check_resume_config` compares the train config stored in the checkpoint with
the new one and refuses a change of any field in `OPTIMISATION_FIELDS` (and of `max_steps` when either config
has a cosine schedule, whose shape it sets), unless the caller allows it (`--allow-config-change`). Fields that
only steer the run around the optimisation (time budget, checkpoint and log cadence, tracker, workers, how many
checkpoints to keep, the fine-tuning start point `init_from`, which only a fresh run reads) may change freely.

`out_dir/history.jsonl` keeps every start and resume, one JSON object per line, appended and never rewritten::

    {"event": "start" | "resume", "step": 0, "time": "2026-05-09T07:35:25+00:00", "num_processes": 1,
     "checkpoint": null | "step_000200", "train_config": {...}, "changed": {"lr": [0.0001, 0.0002], ...}}

so the settings of every part of a run survive `config-<stage>.yaml` being rewritten on resume.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from drivesim.configs import TrainConfig, to_dict
from drivesim.errors import CheckpointError, ConfigError

HISTORY_NAME = "history.jsonl"
# fields whose change alters the optimisation a checkpoint continues
OPTIMISATION_FIELDS = ("lr", "betas", "weight_decay", "batch_size", "grad_accum_steps", "warmup_steps", "lr_schedule",
                       "grad_clip", "mixed_precision", "ema_decay", "seed")


def config_changes(stored: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Every field of `cfg` that differs from the stored config (a `to_dict(TrainConfig)`): {field: (old, new)}.

    A field missing from `stored` (a checkpoint written before the field existed) counts as its default.
    """
    new = to_dict(cfg)
    defaults = {f.name: to_dict(f.default) if f.default is not dataclasses.MISSING else to_dict(f.default_factory())
                for f in dataclasses.fields(TrainConfig)}
    return {k: (stored.get(k, defaults[k]), v) for k, v in new.items() if stored.get(k, defaults[k]) != v}


def check_resume_config(checkpoint: Path, cfg: TrainConfig, allow_change: bool = False) -> dict[str, tuple]:
    """Compare `cfg` with the train config stored in `checkpoint` (a training checkpoint folder).

    Returns:
        All changed fields, {field: (old, new)} (JSON values), the free ones included.

    Raises:
        ConfigError: a field that alters the optimisation changed and `allow_change` is False; one line naming
            the field, the old and the new value.
        CheckpointError: the checkpoint's config.json is unreadable or holds no train config.
    """
    from drivesim.training.checkpoint import CONFIG_NAME, read_json

    path = Path(checkpoint) / CONFIG_NAME
    stored = read_json(path).get("train_config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: train_config: missing")
    changes = config_changes(stored, cfg)
    cosine = "cosine" in (stored.get("lr_schedule"), cfg.lr_schedule)
    altered = [k for k in changes if k in OPTIMISATION_FIELDS or (k == "max_steps" and cosine)]
    if altered and not allow_change:
        k = altered[0]
        old, new = (json.dumps(v) for v in changes[k])
        why = " (the length of the cosine schedule)" if k == "max_steps" else ""
        more = f" (also changed: {', '.join(altered[1:])})" if len(altered) > 1 else ""
        raise ConfigError(f"{path}: train.{k}: changed from {old} to {new} since this checkpoint{why}{more}; a resume "
                          "continues the same optimisation: pass --allow-config-change to accept the change "
                          "(it is recorded in history.jsonl), or train into a new folder")
    return changes


def append_history(out_dir: Path, *, event: str, step: int, cfg: TrainConfig, checkpoint: Path | None,
                   changed: dict[str, tuple], num_processes: int) -> Path:
    """Append one line to `out_dir/history.jsonl` (one write of the whole line, then fsync).

    Raises:
        WriteError: the line cannot be written (full or read-only disk).
    """
    from drivesim.errors import WriteError

    path = Path(out_dir) / HISTORY_NAME
    record = {"event": event, "step": int(step), "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "num_processes": num_processes, "checkpoint": checkpoint.name if checkpoint is not None else None,
              "train_config": to_dict(cfg), "changed": {k: list(v) for k, v in changed.items()}}
    line = (json.dumps(record) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(28, "short write (disk full?)")
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # no half line
                raise
        finally:
            os.close(fd)
    except OSError as e:
        raise WriteError.from_os(path, e) from None
    return path


def read_history(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `out_dir/history.jsonl`, oldest first ([] when the run has none)."""
    path = Path(out_dir) / HISTORY_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["HISTORY_NAME", "OPTIMISATION_FIELDS", "append_history", "check_resume_config", "config_changes",
           "read_history"]
