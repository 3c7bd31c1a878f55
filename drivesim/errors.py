"""User-facing errors.

Every error caused by bad user input (a file, a field, a flag) is a `DrivesimError` whose message is one line
naming the file and the field. The CLI prints it as one red line and exits non-zero; `--debug` shows the
traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class DrivesimError(Exception):
    """Base class: an error in something the user handed us (file, field, flag, preset)."""


class DataError(DrivesimError):
    """A dataset, clip, annotation, scenario, cache or nuScenes table is missing or invalid."""


class ConfigError(DrivesimError):
    """An unknown preset, an unknown or ill-typed config key, a bad flag value."""


class CheckpointError(DrivesimError):
    """A checkpoint folder is missing files, is corrupt, has another model class or a newer format."""


class WeightsError(DrivesimError):
    """Evaluator weights are absent, fail their sha256 check, or carry a disallowed payload."""


class WriteError(DrivesimError):
    """An output could not be written (a full or read-only disk, an I/O error). The message names the output;
    the writer has removed its temp file, so nothing half-written is left behind."""

    @classmethod
    def from_os(cls, path: object, err: OSError) -> WriteError:
        """`<path>: write: <reason>` from an OSError raised while writing `path`."""
        return cls(f"{path}: write: {err.strerror or err}; nothing was written")
