"""Evaluation result records: the JSON schema every `drivesim eval` result follows, and its reader and writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drivesim.errors import DataError

RESULT_SCHEMA = "drivesim-eval-result"
RESULT_SCHEMA_VERSION = 1


def validate_result(record: Any, where: str = "result") -> dict[str, Any]:
    """Check a result record's schema (as read from JSON). Returns it; raises DataError naming the field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: <root>: expected an object")
    if record.get("schema") != RESULT_SCHEMA:
        raise DataError(f"{where}: schema: expected {RESULT_SCHEMA!r}, got {record.get('schema')!r}")
    version = record.get("schema_version")
    if not isinstance(version, int) or version > RESULT_SCHEMA_VERSION:
        raise DataError(f"{where}: schema_version: {version!r} is not one this drivesim reads "
                        f"(<= {RESULT_SCHEMA_VERSION})")
    kind = record.get("kind")
    if kind == "videos":
        metrics = record.get("metrics")
        if not isinstance(metrics, dict):
            raise DataError(f"{where}: metrics: missing")
        for name in ("fvd", "fid", "kvd"):
            m = metrics.get(name)
            if not isinstance(m, dict) or not isinstance(m.get("mean"), int | float):
                raise DataError(f"{where}: metrics.{name}.mean: missing or not a number")
    elif kind == "fvd_over_time":
        curve = record.get("curve")
        if not isinstance(curve, list) or not curve:
            raise DataError(f"{where}: curve: missing or empty")
        for i, c in enumerate(curve):
            if not isinstance(c, dict) or not isinstance(c.get("start_frame"), int) \
                    or not isinstance(c.get("fvd"), int | float):
                raise DataError(f"{where}: curve[{i}]: needs integer start_frame and numeric fvd")
    else:
        raise DataError(f"{where}: kind: expected 'videos' or 'fvd_over_time', got {kind!r}")
    if not isinstance(record.get("protocol"), dict):
        raise DataError(f"{where}: protocol: missing")
    return record


def write_result(path: str | Path, record: dict[str, Any]) -> None:
    """Write a result record as JSON atomically."""
    from drivesim.datasets.clips import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def read_result(path: str | Path) -> dict[str, Any]:
    """Read and validate a result JSON. Raises DataError naming the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: result: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: result: not valid JSON ({e})") from None
    return validate_result(data, str(path))


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write a record that is not an evaluation result (e.g. the FVD self-test's comparison) as JSON, atomically.

    Raises:
        WriteError: naming `path`.
    """
    from drivesim.atomic import write_json_atomic

    write_json_atomic(path, data)
