"""The terminal: consoles, the standard progress bars and the small tables several commands print.

For command modules only (``*/commands/*``, ``mil/study/commands.py``, ``featstore/cli.py``): library code
reports progress through callbacks and protocols (``featstore.extract.Progress``, ``advance(n)``)
and logs through :mod:`logging`, so it runs the same in a notebook, a worker or a test.
Nothing here imports another package of the toolkit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Callable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

#: Progress, status lines and errors (stdout stays for results).
err_console = Console(stderr=True)
#: Results: tables, summaries, "written to" lines.
out_console = Console()


class RateColumn(ProgressColumn):
    """items/s of a task (rich's speed estimate), blank until known."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.1f}/s" if task.speed else "", style="cyan")


def progress_columns(*extra: ProgressColumn, label: str = "[bold]{task.description}", rate: bool = False,
                     eta: bool = True) -> tuple[ProgressColumn, ...]:
    """The standard columns: label, bar, done/total, [items/s], *extra*, elapsed, [eta + remaining]."""
    cols: list[ProgressColumn] = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    if rate:
        cols.append(RateColumn())
    cols += [*extra, TimeElapsedColumn()]
    if eta:
        cols += [TextColumn("eta"), TimeRemainingColumn()]
    return tuple(cols)


def progress_bar(*extra: ProgressColumn, label: str = "[bold]{task.description}", rate: bool = False,
                 eta: bool = True, console: Console | None = None, transient: bool = False) -> Progress:
    """A rich Progress with :func:`progress_columns`, drawn on stderr unless *console* says otherwise."""
    return Progress(*progress_columns(*extra, label=label, rate=rate, eta=eta),
                    console=console or err_console, transient=transient)


@contextmanager
def counting_bar(label: str, total: int, console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """A bar with rate and ETA; yields the ``advance(n=1)`` callback library code takes as progress."""
    with progress_bar(rate=True, console=console) as p:
        task = p.add_task(label, total=total)
        yield lambda n=1: p.advance(task, n)


class RichProgress:
    """The extraction progress (``featstore.extract.Progress``) drawn with rich: slides, tiles, ETA.

    Plain methods with plain arguments, so this module needs no featstore type.
    """

    def __init__(self, progress: Progress, n_slides: int):
        self.p = progress
        self.slides = progress.add_task("slides", total=n_slides)
        self.tiles = progress.add_task("tiles", total=0)

    def slide_started(self, slide_id: str, n_tiles: int) -> None:
        total = self.p.tasks[self.tiles].total or 0
        self.p.update(self.tiles, total=total + n_tiles, description=f"tiles ({slide_id})")

    def tiles_done(self, n: int) -> None:
        self.p.advance(self.tiles, n)

    def slide_finished(self, slide_id: str, status: str) -> None:
        self.p.advance(self.slides)


@contextmanager
def slide_progress(n_slides: int, console: Console | None = None) -> Iterator[RichProgress]:
    """The extraction bars (slides and tiles, with tiles/s and ETA) for *n_slides* slides."""
    with progress_bar(rate=True, console=console) as p:
        yield RichProgress(p, n_slides)


def reason_table(title: str, reasons: Iterable[tuple[str, str]]) -> Table:
    """A two-column table slide -> reason (failed slides, the failure log); long reasons wrap."""
    t = Table(title=title, show_lines=False)
    t.add_column("slide")
    t.add_column("reason", overflow="fold")
    for sid, reason in reasons:
        t.add_row(sid, reason)
    return t


def fmt3(x: float | None) -> str:
    """A metric with three decimals, ``-`` when missing."""
    return "-" if x is None else f"{x:.3f}"


__all__ = ["RateColumn", "RichProgress", "counting_bar", "err_console", "fmt3", "out_console", "progress_bar",
           "progress_columns", "reason_table", "slide_progress"]
