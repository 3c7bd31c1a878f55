"""Guards for command outputs: never write over a command's own input, never replace a file without being asked,
never leave a folder of debris behind a run that failed before it had anything to resume from."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from drivesim.errors import ConfigError


def check_output(out: Path, inputs: dict[str, Path], overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse an output path that is one of the inputs or lies inside an input folder, and an existing output unless
    `overwrite`.

    Args:
        out: the output file or folder.
        inputs: option name -> input path (a file, or a folder whose contents are inputs).
        overwrite: allow replacing an existing `out` (never an input).

    Raises:
        ConfigError: one line naming `out`, the flag and the input it would destroy.
    """
    target = Path(out).resolve()
    for name, path in inputs.items():
        src = Path(path).resolve()
        if target == src or (src.is_dir() and src in target.parents):
            raise ConfigError(f"{out}: {flag}: would write over the input given as {name} ({path}); choose an "
                              "output outside the inputs")
    if target.exists() and not overwrite:
        raise ConfigError(f"{out}: {flag}: already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def undo_unless_resumable(folder: Path, resumable: Callable[[], bool], restore: Sequence[str] = ()) -> Iterator[None]:
    """Run the block; if it fails (any exception, Ctrl-C, SIGTERM) and `resumable()` is then False, put `folder`
    back as it was: what the block created in it is removed (the folder too when the block created it), and the
    files named in `restore` (records the block rewrites or appends to) get their earlier bytes back.

    A run that fails after writing something a resume continues from (a checkpoint, a rollout state) is kept
    whole: its records describe that state. The undo is best effort and never hides the original exception.
    """
    folder = Path(folder)
    existed = folder.is_dir()
    before = {p.name for p in folder.iterdir()} if existed else set()
    saved = {name: (folder / name).read_bytes() for name in restore if (folder / name).is_file()}
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            if not resumable():
                _undo(folder, existed, before, saved)
        raise


def _undo(folder: Path, existed: bool, before: set[str], saved: dict[str, bytes]) -> None:
    from drivesim.atomic import write_bytes_atomic

    if not existed:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.iterdir():
        if path.name in before:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for name, data in saved.items():
        if (folder / name).read_bytes() != data:
            write_bytes_atomic(folder / name, data)


def shown_path(path: str | Path) -> str:
    """`path` as a record or a report shows it: relative to the working directory when it lies inside it (the
    shipped checkpoints resolve to absolute paths of the install; a report should not name the machine's
    folders), else absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)
