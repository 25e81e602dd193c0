"""Command-line entry points: the `featstore` and `mil` typer apps.

Commands live beside the code they drive (``<package>/commands/<topic>.py``, each with a
``register(app)``); this module only assembles the two apps and turns the packages' own
errors into one red line on stderr and exit code 1 (so are a full disk and an unreachable object
store, whichever command meets them), and Ctrl-C into one line and exit code 130.
"""

from __future__ import annotations

import functools
import logging
import sys

import typer
from rich.logging import RichHandler

from featstore.core.errors import CoreError, first_line, resource_problem
from featstore.core.ui import err_console as _err

_USER_ERRORS = (CoreError,)  # every package's base error derives from it


def _setup_logging(verbose: bool) -> None:
    """Rich log lines on a terminal; plain ``LEVEL    message`` lines, never wrapped, in a pipe or a
    log file (rich's log layout would pad them to the console's width)."""
    if _err.is_terminal:
        handler, fmt = RichHandler(console=_err, show_path=False, show_time=False), "%(message)s"
    else:
        handler, fmt = logging.StreamHandler(sys.stderr), "%(levelname)-8s %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, handlers=[handler],
                        force=True)
    # the object-store client stack logs every credential lookup at INFO: keep it for --verbose
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "aiohttp"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _make_app(help_text: str) -> typer.Typer:
    app = typer.Typer(help=help_text, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False)

    @app.callback()
    def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
        _setup_logging(verbose)

    return app


def _quiet_unraisable(unraisable) -> None:
    logging.getLogger(__name__).debug("ignored at exit: %r", unraisable.exc_value)


def _stdout_closed() -> bool:
    """True when stdout's reader has gone (a pipe into `head`); stdout is then pointed at
    /dev/null so the exit-time flush stays silent."""
    import os

    try:
        sys.stdout.flush()
        return False
    except (BrokenPipeError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return True


def _guard(app: typer.Typer) -> typer.Typer:
    """Wrap every registered command so user errors exit with one clear line."""
    for info in app.registered_commands:
        fn = info.callback

        @functools.wraps(fn)
        def wrapped(*args, __fn=fn, **kwargs):
            try:
                return __fn(*args, **kwargs)
            except _USER_ERRORS as exc:
                _err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            except BrokenPipeError:
                if not _stdout_closed():
                    raise
                raise typer.Exit(0) from None   # `featstore encoders | head`: the reader has all it wanted
            except KeyboardInterrupt:
                _err.print("[yellow]interrupted[/]: completed work is kept; rerun to resume")
                raise typer.Exit(130) from None
            except Exception as exc:   # the machine's fault (disk full, store unreachable): one line too
                problem = resource_problem(exc)
                if problem is None:
                    raise
                what = "a remote service is unreachable" if problem == "unreachable" else problem
                # requests abandoned on the dead connection are garbage at exit: not one more traceback each
                sys.unraisablehook = _quiet_unraisable
                _err.print(f"[bold red]error:[/] {what} ({first_line(exc)}); completed work is kept; "
                           "rerun to resume", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None

        info.callback = wrapped
    for group in app.registered_groups:   # sub-apps such as `mil patches`
        _guard(group.typer_instance)
    return app


def _build() -> tuple[typer.Typer, typer.Typer]:
    import analysis.commands
    import featstore.commands
    import mil.commands
    import mil.patches.commands
    import mil.seg.commands
    import mil.study.commands
    import mil.viewer.commands

    fs = _make_app("Slides -> tissue tiles -> encoder embeddings in a chunked Zarr store.")
    ml = _make_app("Tasks over a featstore: attention-MIL (train, predict, heatmaps, top-k fine-tuning), "
                   "patch classification (`mil patches`), segmentation (`mil seg`).")
    featstore.commands.register(fs)
    mil.commands.register(ml)
    analysis.commands.register(fs, ml)
    mil.patches.commands.register(ml)
    mil.seg.commands.register(ml)
    mil.study.commands.register(fs, ml)
    mil.viewer.commands.register(fs)
    return _guard(fs), _guard(ml)


featstore_app, mil_app = _build()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(featstore_app())
