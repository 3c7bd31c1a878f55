"""The `drivesim` command: a typer app whose command groups live in sibling modules.

Errors from bad user input (`DrivesimError`) and anticipated failures of the machine (`OSError`: a full or
read-only disk, a file where a folder is needed; `MemoryError` and torch's allocation failures, which are
RuntimeErrors; `RecursionError` from absurdly nested input) print as one red line and exit with status 1;
`--debug` (anywhere on the command line) shows the traceback instead.

SIGTERM (a job scheduler's stop, `kill PID`) is handled like Ctrl-C: it raises `Terminated`, a KeyboardInterrupt,
where the command is, so every `finally` and `except BaseException` cleanup runs (temp files, partial folders, the
run folder of a training that never checkpointed) and the exit status is 143 (128 + SIGTERM; Ctrl-C gives 130).
"""

from __future__ import annotations

import re
import signal
import sys
import threading

import click
import typer
from drivesim.cli import config as config_cmds
from drivesim.cli import data as data_cmds
from drivesim.cli import demo as demo_cmds
from drivesim.cli import encode as encode_cmds
from drivesim.cli import eval as eval_cmds
from drivesim.cli import export as export_cmds
from drivesim.cli import generate as generate_cmds
from drivesim.cli import report as report_cmds
from drivesim.cli import rollout as rollout_cmds
from drivesim.cli import sample as sample_cmds
from drivesim.cli import scenario as scenario_cmds
from drivesim.cli import stack as stack_cmds
from drivesim.cli import train as train_cmds
from rich.console import Console

from drivesim.errors import DrivesimError

app = typer.Typer(
    name="drivesim",
    help="drivesim: box- and day/night-conditioned driving video with Video Latent Diffusion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_cmds.app, name="data")
app.add_typer(eval_cmds.app, name="eval")
app.command("encode")(encode_cmds.encode_cmd)
app.add_typer(config_cmds.app, name="config")
app.command("train", epilog=train_cmds.EPILOG)(train_cmds.train_cmd)
app.command("report")(report_cmds.report_cmd)
app.command("sample-image")(sample_cmds.sample_image)
app.add_typer(scenario_cmds.app, name="scenario")
app.add_typer(stack_cmds.app, name="stack")
app.command("export")(export_cmds.export_cmd)
app.command("rollout", epilog=rollout_cmds.EPILOG)(rollout_cmds.rollout_cmd)
app.command("generate", epilog=generate_cmds.EPILOG)(generate_cmds.generate_cmd)
app.command("demo", epilog=demo_cmds.EPILOG)(demo_cmds.demo_cmd)

err_console = Console(stderr=True)

# typer >= 0.2x vendors its own click (`typer._click`), older releases use click itself: catch both families.
try:
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # typer built on click
    _TyperClickException = click.ClickException
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort))
_USAGE = (click.ClickException, _TyperClickException)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """drivesim: box- and day/night-conditioned driving video with Video Latent Diffusion."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the same cleanup runs."""


_sigterm = {"received": False}


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    _sigterm["received"] = True
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `drivesim` console script. Returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    previous = None
    _sigterm["received"] = False
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = _run(args, "--debug" in args)
    except Terminated:
        rc = 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if _sigterm["received"]:  # typer reports the interrupt as a plain 130; the cleanup has run by now
        err_console.print("[red]terminated[/red] (SIGTERM)")
        return 128 + signal.SIGTERM
    return rc


def _run(args: list[str], debug: bool) -> int:
    try:
        # standalone_mode=False makes click *return* the code of `raise typer.Exit(code)` instead of exiting
        rc = app(args=args, prog_name="drivesim", standalone_mode=False)
    except _EXIT as e:
        return e.exit_code
    except _USAGE as e:
        e.show()
        return e.exit_code
    except _ABORT:
        err_console.print("[red]aborted[/red]")
        return 130
    except DrivesimError as e:
        if debug:
            raise
        return _one_line(str(e))
    except OSError as e:  # a full or read-only disk, an existing file where a folder is needed, ...
        if debug:
            raise
        where = e.filename if e.filename is not None else "file system"
        extra = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
        return _one_line(f"{where}{extra}: {e.strerror or e} (--debug shows the traceback)")
    except MemoryError:
        if debug:
            raise
        return _one_line(OUT_OF_MEMORY)
    except RuntimeError as e:  # torch reports a failed allocation (CPU or GPU) as a RuntimeError
        if debug or not _is_out_of_memory(e):
            raise
        size = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGT]iB)", str(e))
        tried = "" if size is None else f"; it tried to allocate {size.group(2) or _gib(int(size.group(1)))}"
        return _one_line(OUT_OF_MEMORY + tried)
    except RecursionError:
        if debug:
            raise
        return _one_line("input nested too deeply to read (a config or JSON file with hundreds of nested levels)")
    return rc if isinstance(rc, int) else 0


OUT_OF_MEMORY = ("out of memory: the request is larger than this machine holds (a shorter video, fewer frames or "
                 "samples, or a smaller batch)")


def _is_out_of_memory(e: RuntimeError) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    text = str(e)
    return (oom is not None and isinstance(e, oom)) or "can't allocate memory" in text or "out of memory" in text


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _one_line(message: str) -> int:
    err_console.print(f"[red]error:[/red] {message}", markup=True, highlight=False, soft_wrap=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
