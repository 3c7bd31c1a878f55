"""Atomic file writes: the one way drivesim puts a file or a folder in place.

Every writer writes to a temp name in the destination's folder and renames it onto the destination only when it
is complete, so a reader (or a resumed run) never sees half a file, and a failure (a full or read-only disk, an
exception, Ctrl-C) leaves nothing behind. Failures of the file system become one `WriteError` naming the
destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drivesim.errors import WriteError


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a fresh temp path next to `path`; when the block ends normally the temp file is renamed onto `path`.

    The temp name keeps `suffix` as its extension (writers that pick a format from the name, e.g. PyAV's
    ".mp4", need it). On any exit the temp file is removed if it is still there.

    Raises:
        WriteError: an OSError inside the block or in the rename (the folder is missing or read-only, the disk is
            full), naming `path`. Other exceptions pass through unchanged (the temp file is removed).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError.from_os(path, e) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes, durable: bool = False) -> None:
    """Write `data` to `path` atomically; the file gets the usual permissions (0o666 minus the umask).

    `durable` also flushes the bytes to the disk (fsync) before the rename, for state a power loss must not
    leave half-written (resume state); a killed process is covered either way.

    Raises:
        WriteError: the folder is missing or read-only, the disk is full, an I/O error (names `path`).
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise WriteError.from_os(path, e) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any, durable: bool = False) -> None:
    """Write `data` as JSON (indent 1) to `path` atomically (`write_bytes_atomic`). Raises WriteError naming
    `path`."""
    write_bytes_atomic(path, json.dumps(data, indent=1).encode(), durable)


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Put the complete folder `tmp` in place of `final` (which may exist): rename the old one aside, rename the
    new one in, then delete the old one, so `final` is at every moment either the old or the new folder.

    Raises:
        WriteError: a rename failed (names `final`); the old folder is put back when it can be.
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    try:
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as e:
        if old.exists() and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final)
        raise WriteError.from_os(final, e) from None
    shutil.rmtree(old, ignore_errors=True)
