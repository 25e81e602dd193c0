"""featstore.core.ui: the standard bars, the extraction progress and the shared tables, drawn on real rich consoles."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from featstore.core.ui import (RateColumn, RichProgress, counting_bar, fmt3, progress_bar, progress_columns, reason_table,
                     slide_progress)


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=120, force_terminal=False, color_system=None), buf


def test_standard_columns_and_their_options():
    extra = TextColumn("{task.fields[item]}")
    cols = progress_columns(extra, rate=True)
    kinds = [type(c) for c in cols]
    assert kinds.index(MofNCompleteColumn) < kinds.index(RateColumn) < cols.index(extra)
    assert isinstance(cols[-1], TimeRemainingColumn)
    bare = progress_columns(eta=False)
    assert not any(isinstance(c, (RateColumn, TimeRemainingColumn)) for c in bare)
    assert len(bare) == 4  # label, bar, done/total, elapsed


def test_counting_bar_advances_to_its_total():
    con, buf = _console()
    with counting_bar("h5 files", 3, console=con) as advance:
        advance()
        advance(2)
    text = buf.getvalue()
    assert "h5 files" in text and "3/3" in text


def test_rich_progress_counts_slides_and_tiles():
    con, _ = _console()
    with Progress(console=con) as p:
        rp = RichProgress(p, n_slides=2)
        rp.slide_started("a", 10)
        rp.tiles_done(4)
        rp.slide_started("b", 5)
        rp.tiles_done(11)
        rp.slide_finished("a", "done")
        tiles, slides = p.tasks[rp.tiles], p.tasks[rp.slides]
        assert (tiles.total, tiles.completed, tiles.description) == (15, 15, "tiles (b)")
        assert (slides.total, slides.completed) == (2, 1)


def test_slide_progress_implements_the_extractors_protocol():
    from featstore.extract import Progress as ExtractProgress

    con, buf = _console()
    with slide_progress(1, console=con) as rp:
        for name in ("slide_started", "tiles_done", "slide_finished"):
            assert callable(getattr(rp, name)) and hasattr(ExtractProgress, name)
        rp.slide_started("s0", 3)
        rp.tiles_done(3)
        rp.slide_finished("s0", "done")
    assert "1/1" in buf.getvalue() and "3/3" in buf.getvalue()


def test_progress_bar_draws_on_the_given_console_and_rate_shows_speed():
    con, buf = _console()
    with progress_bar(rate=True, eta=False, console=con) as p:
        t = p.add_task("tiles", total=4)
        p.advance(t, 4)
    assert "tiles" in buf.getvalue() and "4/4" in buf.getvalue()
    assert p.console is con


def test_reason_table_and_metric_format():
    con, buf = _console()
    con.print(reason_table("failure log", [("s1", "corrupt tile at (0, 0)"), ("s2", "no mpp")]))
    text = buf.getvalue()
    assert "failure log" in text and "corrupt tile at (0, 0)" in text and "s2" in text
    assert fmt3(None) == "-" and fmt3(0.12345) == "0.123"
