"""`mil compare`: many run directories -> one grouped table (Markdown, CSV) and a bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from featstore.core.ui import out_console as _console


def compare(
    run_dirs: Annotated[List[Path], typer.Argument(help="mil run directories, or folders containing them.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for compare.md/.csv/.png.")],
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", help="Group to compare against: ENCODER:WEIGHTS:minusK[:KIND].")] = None,
    unit: Annotated[str, typer.Option(
        "--unit", help="Observation for mean/sd/Welch: 'fold' (every fold of every run) or 'run'.")] = "fold",
) -> None:
    """Group runs by encoder x weights x level x kind: mean +- sd AUC (C-index for survival runs, Pearson r for
    regression), delta vs baseline, Welch p."""
    from analysis.compare import TITLES, compare_runs, format_p, notes, write_outputs

    rows = compare_runs(run_dirs, baseline=baseline, unit=unit)
    paths = write_outputs(rows, out)
    table = Table(title=f"{len(rows)} groups")
    table.add_column("group", no_wrap=True)
    for col, just in [ ("n", "right"), (TITLES[rows[0].metric], "right"), ("95% CI", "right"),
                      ("Δ vs baseline", "right"), ("p", "right")]:
        table.add_column(col, justify=just)
    for r in rows:
        sd = "" if r.score_sd is None else f" ± {r.score_sd:.3f}"
        delta = "baseline" if r.is_baseline else ("" if r.delta is None else f"{r.delta:+.3f}")
        table.add_row(r.key.label(), str(r.n), "n/a" if r.score is None else f"{r.score:.3f}{sd}",
                      f"{r.ci[0]:.3f}–{r.ci[1]:.3f}", delta, format_p(r.p))
    _console.print(table)
    for note in notes(rows):
        _console.print(note, markup=False, highlight=False, soft_wrap=True)
    _console.print("wrote " + ", ".join(str(p) for p in paths.values()))


def register(featstore_app: typer.Typer, mil_app: typer.Typer) -> None:
    mil_app.command("compare")(compare)
