"""The `drivesim` command: a typer app whose command groups live in sibling modules.

Errors from bad user input (`DrivesimError`) and anticipated failures of the machine (`OSError`: a full or
read-only disk, a file where a folder is needed; `MemoryError` and torch's allocation failures, which are
RuntimeErrors; `RecursionError` from absurdly nested input) print as one red line and exit with status 1;
`--debug` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import re
import sys

import click
import typer
from drivesim.cli import config as config_cmds
from drivesim.cli import data as data_cmds
from drivesim.cli import demo as demo_cmds
from drivesim.cli import encode as encode_cmds
from drivesim.cli import eval as eval_cmds
from drivesim.cli import export as export_cmds
from drivesim.cli import report as report_cmds
from drivesim.cli import rollout as rollout_cmds
from drivesim.cli import sample as sample_cmds
from drivesim.cli import scenario as scenario_cmds
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
app.command("export")(export_cmds.export_cmd)
app.command("rollout", epilog=rollout_cmds.EPILOG)(rollout_cmds.rollout_cmd)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `drivesim` console script. Returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
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
