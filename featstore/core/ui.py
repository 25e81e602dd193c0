"""The terminal: consoles, the standard progress bars and the small tables several commands print.

For command modules only (``*/commands/*``, ``mil/study/commands.py``, ``featstore/cli.py``): library code
reports progress through callbacks and protocols (``featstore.extract.Progress``, ``advance(n)``)
and logs through :mod:`logging`, so it runs the same in a notebook, a worker or a test.
Nothing here imports another package of the toolkit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Callable

from rich.console import Console, ConsoleDimensions
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

#: The width of a console that is not a terminal (a pipe, a log file, a test's capture): wide
#: enough that rich never folds or cuts a name, a weights tag or a path a user must copy.
UNWRAPPED = 100_000


class ToolConsole(Console):
    """A rich console that lays out for the terminal's width on a terminal and never wraps
    elsewhere (``COLUMNS`` or an explicit width still win)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or self._width is not None or self._environ.get("COLUMNS"):
            return size
        return ConsoleDimensions(UNWRAPPED, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


#: Progress, status lines and errors (stdout stays for results).
err_console = ToolConsole(stderr=True)
#: Results: tables, summaries, "written to" lines.
out_console = ToolConsole()


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


class PlainProgress(Progress):
    """A Progress for consoles that are not terminals: no live bar, plain lines instead: one when
    a task starts, one at every new tenth of it, one after *every* seconds without a line while it
    moves, and one at the end; each ``label done/total (pct) [rate] [texts] elapsed``, never cut."""

    def __init__(self, *columns: ProgressColumn, console: Console, every: float = 30.0, **kwargs: Any):
        super().__init__(*columns, console=console, disable=True, **kwargs)
        self.every = every
        self._said: dict[TaskID, tuple[int | None, float, float]] = {}   # task -> (tenth, time, completed)

    def add_task(self, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(*args, **kwargs)
        self._say(task_id)
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._say(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def stop(self) -> None:
        for task in self.tasks:
            self._say(task.id, final=True)
        super().stop()

    def line(self, task: Task) -> str:
        """The plain line of *task*: its text columns, done/total, percentage, rate, elapsed."""
        texts = [Text.from_markup(c.text_format.format(task=task)).plain.strip()
                 for c in self.columns if isinstance(c, TextColumn) and c.text_format not in ("eta",)]
        label, extra = (texts[0] if texts else ""), [x for x in texts[1:] if x]
        done = f"{task.completed:g}" + (f"/{task.total:g} ({100 * task.completed / task.total:.0f}%)"
                                        if task.total else "")
        rate = f"{task.speed:,.1f}/s" if task.speed else ""
        elapsed = time.strftime("%H:%M:%S", time.gmtime(task.elapsed or 0))
        return " ".join(x for x in (label, done, rate, *extra, elapsed) if x)

    def _say(self, task_id: TaskID, final: bool = False) -> None:
        task = self._tasks[task_id]
        tenth = int(10 * task.completed / task.total) if task.total else None
        now = time.monotonic()
        last = self._said.get(task_id)
        if last is not None:
            moved = task.completed != last[2]
            due = tenth != last[0] or now - last[1] >= self.every   # a new tenth, or a heartbeat
            if not moved or not (final or due):
                return
        self._said[task_id] = (tenth, now, task.completed)
        self.console.print(self.line(task), markup=False, highlight=False, soft_wrap=True)


def progress_bar(*extra: ProgressColumn, label: str = "[bold]{task.description}", rate: bool = False,
                 eta: bool = True, console: Console | None = None, transient: bool = False) -> Progress:
    """A rich Progress with :func:`progress_columns`, drawn on stderr unless *console* says
    otherwise; a :class:`PlainProgress` of plain lines when that console is not a terminal."""
    console = console or err_console
    columns = progress_columns(*extra, label=label, rate=rate, eta=eta)
    if not console.is_terminal:
        return PlainProgress(*columns, console=console)
    return Progress(*columns, console=console, transient=transient)


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


#: ``--format`` of list commands: a rich table for people, TSV and JSON for pipes and programs.
FORMATS = ("table", "tsv", "json")


def check_format(fmt: str) -> str:
    """*fmt* if it is one of :data:`FORMATS`; else the one-line error every list command gives."""
    if fmt not in FORMATS:
        from featstore.core.errors import ConfigError

        raise ConfigError(f"--format {fmt!r} must be one of {', '.join(FORMATS)}")
    return fmt


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value)
    return "" if value is None else " ".join(str(value).split())   # no tab or newline inside a cell


def write_tsv(records: list[dict], columns: list[str] | None = None) -> None:
    """*records* as tab-separated lines with a header, whole values (lists joined by commas), on stdout."""
    import typer

    columns = columns or (list(records[0]) if records else [])
    typer.echo("\t".join(columns))
    for rec in records:
        typer.echo("\t".join(_cell(rec.get(c)) for c in columns))


def write_json(doc: Any) -> None:
    """*doc* as indented JSON on stdout."""
    import json

    import typer

    typer.echo(json.dumps(doc, indent=2, default=str))


def fmt3(x: float | None) -> str:
    """A metric with three decimals, ``-`` when missing."""
    return "-" if x is None else f"{x:.3f}"


__all__ = ["FORMATS", "PlainProgress", "check_format", "write_json", "write_tsv", "RateColumn", "RichProgress", "ToolConsole", "UNWRAPPED", "counting_bar", "err_console", "fmt3", "out_console", "progress_bar",
           "progress_columns", "reason_table", "slide_progress"]
