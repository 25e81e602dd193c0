"""The ratio table every benchmark script prints: measure, ratio, detail."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(rows: Sequence[tuple[str, float, str]]) -> None:
    """Print *rows* of (measure, ratio, detail) as aligned columns."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure'.ljust(width)}  ratio  detail")
    for name, ratio, detail in rows:
        print(f"{name.ljust(width)}  {ratio:5.2f}  {detail}")
