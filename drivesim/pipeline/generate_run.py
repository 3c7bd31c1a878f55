"""The output folder of a `drivesim generate` run while it is made: what it holds (nothing yet, an unfinished run,
a finished dataset), the done record of each finished clip, the failure records of processes, the main process's
wait for the others, and the manifest written last.

    OUT/.generate/run.json            {"run": hash, "identity": what decides the outputs}
    OUT/.generate/done/<id>.json      {"run", "index", "split", "row" (the clip's manifest extras), "sizes"}
    OUT/.generate/failed-<rank>.json  {"rank", "time", "error"}
    OUT/.generate/work/               clips in progress (`drivesim.pipeline.generate`)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivesim.datasets.clips import write_json_atomic, write_manifest
from drivesim.errors import ConfigError, DrivesimError

STATE = ".generate"


class ShardFailed(DrivesimError):
    """Another process of a multi-process generate failed; its clips are missing from the dataset."""


class RunFolder:
    """`out` as the folder of the run `run` (a hash of `identity`, the settings that decide the outputs)."""

    def __init__(self, out: Path, run: str, identity: dict[str, Any]):
        self.out, self.run, self.identity = Path(out), run, identity
        self.state_dir = self.out / STATE
        self.work = self.state_dir / "work"

    # -- what the folder holds -------------------------------------------------------------------------------
    def state(self) -> str:
        """"new", "resume" (an unfinished run of these settings) or "complete" (its manifest is written). Reads
        only.

        Raises:
            ConfigError: `out` is a file, holds other files, another dataset, or a run of other settings (the
                first differing setting named).
        """
        out = self.out
        if not out.exists():
            return "new"
        if not out.is_dir():
            raise ConfigError(f"{out}: --out: exists and is not a folder")
        manifest = out / "manifest.json"
        if manifest.is_file():
            recorded = _read_object(manifest).get("generate")
            recorded = recorded if isinstance(recorded, dict) else {}
            if recorded.get("run") == self.run:
                return "complete"
            what = f"another {self._first_difference(recorded)}" if recorded else "another command"
            raise ConfigError(f"{out}: --out: holds a finished dataset made with {what}; choose another --out")
        record = self.state_dir / "run.json"
        if record.is_file():
            old = _read_object(record)
            if old.get("run") == self.run:
                return "resume"
            before = old.get("identity") if isinstance(old.get("identity"), dict) else {}
            key = self._first_difference(before)
            raise ConfigError(f"{out}: --out: holds an unfinished generate run with another {key} "
                              f"({before.get(key)!r} there, {self.identity.get(key)!r} now); rerun it with its "
                              "options to finish it, or choose another --out")
        if any(p.name != STATE for p in out.iterdir()):
            raise ConfigError(f"{out}: --out: not empty and not a drivesim generate run; choose another --out")
        return "new"

    def _first_difference(self, before: dict) -> str:
        return next((k for k in self.identity if before.get(k) != self.identity[k]), "settings")

    def resumable(self) -> bool:
        """The folder holds a finished clip or a rollout state to continue from."""
        return any((self.state_dir / "done").glob("*.json")) or any(self.work.glob("*/state.json"))

    # -- records ----------------------------------------------------------------------------------------------
    def start(self, rank: int, world: int) -> None:
        """Make the bookkeeping folders, record the run (every process writes the same bytes) and clear this
        process's failure record of an earlier run (the main process: also those of ranks beyond `world`)."""
        for d in (self.state_dir / "done", self.work):
            d.mkdir(parents=True, exist_ok=True)
        if not (self.state_dir / "run.json").is_file():
            write_json_atomic(self.state_dir / "run.json", {"run": self.run, "identity": self.identity})
        (self.state_dir / f"failed-{rank}.json").unlink(missing_ok=True)
        if rank == 0:
            for stale in self.state_dir.glob("failed-*.json"):
                tail = stale.stem.rpartition("-")[2]
                if not tail.isdigit() or int(tail) >= world:
                    stale.unlink(missing_ok=True)

    def mark_done(self, clip_id: str, index: int, split: str, row: dict[str, Any]) -> None:
        """Record clip `clip_id` finished (after its mp4 and json are in place): its manifest row extras and the
        sizes of its files."""
        sizes = {ext: (self.out / f"{clip_id}.{ext}").stat().st_size for ext in ("mp4", "json")}
        write_json_atomic(self.state_dir / "done" / f"{clip_id}.json",
                          {"run": self.run, "index": index, "split": split, "row": row, "sizes": sizes})

    def done_record(self, clip_id: str) -> dict | None:
        rec = _read_object(self.state_dir / "done" / f"{clip_id}.json")
        return rec if rec.get("run") == self.run else None

    def is_done(self, clip_id: str) -> bool:
        """The clip's done record is there, of this run, and its files have the sizes it recorded (a file truncated
        or removed since makes the clip be made again)."""
        rec = self.done_record(clip_id)
        if rec is None:
            return False
        for ext, size in rec.get("sizes", {}).items():
            f = self.out / f"{clip_id}.{ext}"
            if not f.is_file() or f.stat().st_size != size:
                return False
        return True

    def count_done(self, ids: list[str]) -> int:
        done = self.state_dir / "done"
        names = {p.stem for p in done.iterdir()} if done.is_dir() else set()
        return sum(i in names for i in ids)

    def record_failure(self, rank: int, error: BaseException) -> None:
        """Tell the main process that this process failed (best effort: never hides `error`)."""
        if self.state_dir.is_dir():
            try:
                write_json_atomic(self.state_dir / f"failed-{rank}.json",
                                  {"rank": rank, "time": time.time(), "error": str(error) or type(error).__name__})
            except (OSError, DrivesimError):
                pass

    # -- the end ----------------------------------------------------------------------------------------------
    def wait_for(self, ids: list[str], since: float, world: int, on_progress: Callable[[int], None],
                 log: Callable[[str], None], poll_s: float = 1.0) -> None:
        """Block until every clip of `ids` has a done record (the main process, after its own share).

        Raises:
            ShardFailed: a process wrote a failure record at or after `since` (a record of an earlier run is not
                this run's news).
        """
        said = False
        missing = list(ids)
        while True:
            missing = [i for i in missing if self.done_record(i) is None]  # a done record stays: look at the rest
            on_progress(len(ids) - len(missing))
            if not missing:
                return
            for f in sorted(self.state_dir.glob("failed-*.json")):
                rec = _read_object(f)
                if rec.get("time", 0) >= since:
                    raise ShardFailed(f"{self.out}: process {rec.get('rank')} of {world} failed ({rec.get('error')}); "
                                      f"{len(missing)} clip(s) missing; rerun the same command to finish them "
                                      "(finished clips are kept)")
            if not said:
                log(f"waiting for {len(missing)} clip(s) of the other process(es) (a process that died leaves them: "
                    "rerun the same command to finish them)")
                said = True
            time.sleep(poll_s)

    def finish(self, ids: list[str], meta: dict[str, Any]) -> Path:
        """Write the manifest (clips in `ids` order, each row with its done record's extras; `meta` at the top)
        and remove the bookkeeping. Every clip must be done."""
        rows, extra = [], {}
        for i in ids:
            rec = self.done_record(i)
            rows.append((i, rec["split"]))
            extra[i] = rec["row"]
        path = write_manifest(self.out, rows, clip_meta=extra, **meta)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return path


def _read_object(path: Path) -> dict:
    """The JSON object in `path`; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
