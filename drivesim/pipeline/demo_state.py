"""The demo's bookkeeping: which stages finished with which config (demo_state.json), data fingerprints, budget
flags."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from drivesim.errors import ConfigError, DataError

STEPS = ("autoencoder", "encode", "video_decoder", "image_ldm", "prediction", "interpolation", "scenarios",
         "rollout", "eval", "report")
TRAIN_STEPS = ("autoencoder", "video_decoder", "image_ldm", "prediction", "interpolation")
STATE_FORMAT = "drivesim-demo-state"
STATE_VERSION = 1


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
