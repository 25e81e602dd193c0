"""The toolkit's one labels reader: a strict, BOM-safe CSV primitive and the labels table on top.

Labels: ``slide_id,label[,patient_id][,site][,split|fold]``, one row per slide; a survival table
carries ``time,event`` (``label`` optional) and a regression table a numeric ``label``. Every reader of a
labels file (`mil train`, `mil finetune`, the probes) goes through :func:`read_labels`, so the
rules are the same everywhere: a UTF-8 BOM is ignored, cells and headers are stripped, unknown
columns, empty/NaN labels and duplicate slides are refused, and every problem is one
``LabelsError`` line naming the file and the CSV line numbers (``error=`` picks the subclass a
package raises: mil passes :class:`mil.errors.LabelsError`, a MilError too).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from featstore.core.errors import LabelsError

log = logging.getLogger(__name__)

REQUIRED = ("slide_id", "label")
OPTIONAL = ("patient_id", "site", "split", "fold")
SURVIVAL = ("time", "event")
TASKS = ("auto", "classification", "survival", "regression")
MAX_INT_CLASSES = 10   # integer labels with more distinct values are ambiguous for task=auto
SPLIT_VALUES = ("train", "val", "test")
NA = frozenset({"", "nan", "na", "n/a", "none", "null"})


class Row(dict):
    """One CSV record: ``{column: stripped cell}``, with ``line`` its line number in the file."""

    line: int = 0


class Rows(list):
    """The records of a table, with ``columns`` the (kept) header names in file order."""

    columns: tuple[str, ...] = ()


def rows_text(rows: Sequence, limit: int = 10) -> str:
    """``"3, 5, 9"``, shortened to *limit* items with the total."""
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" ... ({len(rows)} in all)" if len(rows) > limit else "")


def sort_classes(values: Iterable[str]) -> list[str]:
    """Distinct class names, numerically when every one is a number, else as strings."""
    uniq = set(values)
    try:
        return sorted(uniq, key=lambda v: (float(v), v))
    except ValueError:
        return sorted(uniq)


def _need(required: Sequence[str], optional: Sequence[str]) -> str:
    return ",".join(required) + (f" and optionally {', '.join(optional)}" if optional else "")


def read_table(path: str | Path, required: Sequence[str], optional: Sequence[str] = (), *,
               extra: str = "error", what: str = "CSV file", error: type[Exception] = LabelsError) -> Rows:
    """Rows of a CSV with a header, every cell stripped; a UTF-8 BOM is ignored.

    Missing *required* columns raise ``LabelsError``; columns in neither *required* nor
    *optional* raise too (``extra="error"``) or are dropped (``extra="ignore"``). A record with
    more cells than the header raises with its line number.
    """
    if extra not in ("error", "ignore"):
        raise ValueError(f"extra={extra!r}: choose 'error' or 'ignore'")
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist; pass a CSV with columns {','.join(required)}")
    allowed = (*required, *optional)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        raw_header = next(reader, [])
        header = [h.strip() for h in raw_header]
        if not any(header):
            raise error(f"{path}: empty file (no header line); need a header {','.join(required)}")
        if len(header) == 1:
            guess = next((d for d in (";", "\t", "|") if d in header[0]), None)
            if guess is not None:
                raise error(f"{path}: the delimiter looks like {guess!r} (header {header[0]!r}); "
                                  f"write a comma-separated file with columns {','.join(required)}")
        missing = [c for c in required if c not in header]
        if missing:
            raise error(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'} "
                              f"(need {_need(required, optional)})")
        unknown = [c for c in header if c not in allowed]
        if unknown and extra == "error":
            raise error(f"{path}: unknown column(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        rows = Rows()
        rows.columns = tuple(h for h in header if h in allowed)
        for cells in reader:
            if not cells:
                continue   # a blank line
            if len(cells) > len(header):
                raise error(f"{path}: line {reader.line_num} has {len(cells)} cells but the header "
                                  f"has {len(header)}; quote cells that contain commas")
            row = Row({h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header)
                       if h in allowed})
            row.line = reader.line_num
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Labels:
    """A parsed labels CSV: one row per slide, labels as class indices into ``classes``."""

    path: str
    slide_ids: tuple[str, ...]
    y: np.ndarray                        # (n,) int64 index into classes
    classes: tuple[str, ...]             # sorted (numerically when every label is an integer)
    patients: tuple[str, ...]            # patient_id, or the slide_id when the column is absent
    split: tuple[str, ...] | None = None  # train/val/test per slide
    fold: tuple[str, ...] | None = None   # predefined fold per slide
    site: tuple[str, ...] | None = None   # acquisition site per slide (hospital, TCGA tissue-source site)
    task: str = "classification"          # classification | survival | regression
    #: survival: (n, 2) float64 [time, event]; regression: (n,) float64; None for classification.
    #: ``y`` then holds the strata the folds balance (survival: event x time half; regression: quartile).
    target: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.slide_ids)

    def subset(self, keep: Sequence[int]) -> "Labels":
        """Rows *keep* (in that order)."""
        keep = list(keep)
        pick = lambda t: None if t is None else tuple(t[i] for i in keep)  # noqa: E731
        return replace(self, slide_ids=pick(self.slide_ids), y=self.y[keep],
                       patients=pick(self.patients), split=pick(self.split), fold=pick(self.fold),
                       site=pick(self.site), target=None if self.target is None else self.target[keep])


def _lines(rows: Sequence[Row], bad) -> list[int]:
    return [r.line for r in rows if bad(r)]


def _check_rows(path: Path, rows: Sequence[Row], header: set[str], *, error: type[Exception] = LabelsError) -> None:
    """Every per-row rule of a labels file; the first broken one raises."""
    if "split" in header and "fold" in header:
        raise error(f"{path}: has both 'split' and 'fold' columns; keep one")
    if not rows:
        raise error(f"{path}: no rows; add one line per slide (slide_id,label)")
    no_id = _lines(rows, lambda r: r["slide_id"].lower() in NA)
    if no_id:
        raise error(f"{path}: empty slide_id on line(s) {rows_text(no_id)}")
    nan = _lines(rows, lambda r: r["label"].lower() in NA) if "label" in header else []
    if nan:
        raise error(f"{path}: empty/NaN label on line(s) {rows_text(nan)}; fill them or drop those rows")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["slide_id"]] = counts.get(r["slide_id"], 0) + 1
    dup = sorted(s for s, c in counts.items() if c > 1)
    if dup:
        raise error(f"{path}: duplicate slide_id(s) {rows_text(dup)}; one row per slide")
    if "split" in header:
        bad = _lines(rows, lambda r: r["split"].lower() not in SPLIT_VALUES)
        if bad:
            raise error(f"{path}: split must be train/val/test; bad value on line(s) {rows_text(bad)}")
    if "fold" in header:
        bad = _lines(rows, lambda r: r["fold"].lower() in NA)
        if bad:
            raise error(f"{path}: empty fold on line(s) {rows_text(bad)}")
    if "patient_id" in header and "label" in header:
        _check_patients(path, rows, error=error)
    if "site" in header:
        _check_sites(path, rows, error=error)


def _patient(row: Row) -> str:
    """The row's patient: patient_id, or the slide itself when the column is absent or empty."""
    return row.get("patient_id", "") or row["slide_id"]


def _check_patients(path: Path, rows: Sequence[Row], *, error: type[Exception] = LabelsError) -> None:
    """Warn (one line naming the patients) when a patient's slides carry different labels.

    Not refused: existing cohorts (and tests) hold such patients; patient-grouped folds keep all
    of a patient's slides in one fold, so nothing leaks, but the user should know."""
    labels: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        labels.setdefault(_patient(r), {}).setdefault(r["label"], []).append(r.line)
    mixed = sorted(p for p, ls in labels.items() if len(ls) > 1)
    if mixed:
        shown = [f"{p} ({', '.join(f'{lab} on line {rows_text(ln)}' for lab, ln in sorted(labels[p].items()))})"
                 for p in mixed]
        log.warning("%s: patient(s) %s have slides with different labels; folds are grouped by patient, "
                    "so each such patient's slides stay in one fold", path, rows_text(shown))


def _check_sites(path: Path, rows: Sequence[Row], *, error: type[Exception] = LabelsError) -> None:
    """Every slide has a site, and a patient's slides all come from one site."""
    bad = _lines(rows, lambda r: r["site"].lower() in NA)
    if bad:
        raise error(f"{path}: empty site on line(s) {rows_text(bad)}; fill them or drop the site column")
    sites: dict[str, set[str]] = {}
    for r in rows:
        sites.setdefault(_patient(r), set()).add(r["site"])
    mixed = sorted(p for p, s in sites.items() if len(s) > 1)
    if mixed:
        shown = [f"{p} ({', '.join(sorted(sites[p]))})" for p in mixed]
        raise error(f"{path}: patient(s) {rows_text(shown)} have slides from more than one site; "
                          "a patient belongs to one site")


def _float(path: Path, rows: Sequence[Row], col: str, error: type[Exception]) -> np.ndarray:
    """Column *col* as float64; an empty or non-numeric cell raises with its line numbers."""
    bad = []
    out = np.empty(len(rows), np.float64)
    for i, r in enumerate(rows):
        try:
            out[i] = float(r[col]) if r[col].lower() not in NA else np.nan
        except ValueError:
            out[i] = np.nan
        if not np.isfinite(out[i]):
            bad.append(r.line)
    if bad:
        raise error(f"{path}: {col} must be a number; empty or not numeric on line(s) {rows_text(bad)}")
    return out


def _is_number(v: str) -> bool:
    try:
        return np.isfinite(float(v))
    except ValueError:
        return False


def infer_task(path: Path, rows: Sequence[Row], header: set[str], task: str = "auto", *,
               error: type[Exception] = LabelsError) -> str:
    """The task a labels table asks for: the one *task* names (checked against the columns), or,
    for ``auto``, survival when ``time,event`` are present, classification for names or up to
    :data:`MAX_INT_CLASSES` integers (0/1, grades), regression for non-integer numbers; more
    integers than that are ambiguous (many classes or a count?) and refused in one line."""
    if task not in TASKS:
        raise error(f"task {task!r}: choose {', '.join(TASKS)}")
    surv = [c for c in SURVIVAL if c in header]
    if task == "survival" or (task == "auto" and surv):
        if len(surv) < 2:
            raise error(f"{path}: a survival table needs both columns time,event; found {', '.join(surv) or 'neither'}")
        return "survival"
    if "label" not in header:
        raise error(f"{path}: missing column label; found {', '.join(sorted(header))} (need slide_id,label, "
                    "or slide_id,time,event for survival)")
    if task != "auto":
        return task
    values = [r["label"] for r in rows if r["label"].lower() not in NA]
    uniq = set(values)
    if len(uniq) <= 2 or not all(_is_number(v) for v in values):
        return "classification"
    if all(float(v).is_integer() for v in values):
        if len(uniq) <= MAX_INT_CLASSES:
            return "classification"
        raise error(f"{path}: label holds {len(uniq)} different integers ({rows_text(sort_classes(uniq), 5)}): "
                    "pass --task classification (that many classes) or --task regression (a score or count)")
    return "regression"


def _strata(values: np.ndarray, n: int) -> np.ndarray:
    """Quantile bin (0..n-1) of each value: what stratified folds balance for a continuous target."""
    if len(np.unique(values)) <= 1:
        return np.zeros(len(values), np.int64)
    edges = np.quantile(values, np.linspace(0, 1, n + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").astype(np.int64)


def _survival_labels(path: Path, rows: Rows, error: type[Exception]) -> tuple[np.ndarray, np.ndarray]:
    """(target (n, 2) [time, event], strata): times >= 0, events 0/1, at least two events."""
    time = _float(path, rows, "time", error)
    neg = [r.line for r, t in zip(rows, time) if t < 0]
    if neg:
        raise error(f"{path}: time must be >= 0; negative on line(s) {rows_text(neg)}")
    bad = [r.line for r in rows if r["event"] not in ("0", "1", "0.0", "1.0", "true", "false", "True", "False")]
    if bad:
        raise error(f"{path}: event must be 0 (censored) or 1 (event); bad value on line(s) {rows_text(bad)}")
    event = np.array([1.0 if r["event"] in ("1", "1.0", "true", "True") else 0.0 for r in rows])
    if event.sum() < 2:
        raise error(f"{path}: {int(event.sum())} event(s) among {len(rows)} slides; survival needs at least "
                    "two events (event=1)")
    strata = event.astype(np.int64) * 2 + _strata(time, 2)
    return np.stack([time, event], 1), strata


def read_labels(path: str | Path, *, error: type[Exception] = LabelsError, task: str = "auto",
                column: str = "label", others: Sequence[str] = ()) -> Labels:
    """Parse and validate a labels CSV; every problem is one ``LabelsError`` line.

    *task* is ``auto`` (see :func:`infer_task`), ``classification``, ``survival`` (columns
    ``time,event``) or ``regression`` (a numeric ``label``). A multi-target table names its label
    columns itself: *column* is the one read as the label, *others* the other targets' columns
    (allowed, not read); rows whose *column* is empty are then left out with a warning (a cohort
    rarely has every target for every slide)."""
    path = Path(path)
    targets = tuple(dict.fromkeys((column, *others))) if column != "label" or others else ()
    rows = read_table(path, ("slide_id", *targets), (*(targets or ("label",)), *SURVIVAL, *OPTIONAL),
                      what="labels file", error=error)   # a target column that is not there: one line first
    if targets:
        rows = _one_target(path, rows, column, error)
    header = set(rows.columns)
    task = infer_task(path, rows, header, task, error=error)
    if task != "survival" and any(c in header for c in SURVIVAL):
        raise error(f"{path}: columns time,event belong to a survival table; drop them or pass --task survival")
    _check_rows(path, rows, header, error=error)
    column = lambda c: tuple(r[c] for r in rows) if c in header else None  # noqa: E731
    split = column("split")
    common = dict(patients=tuple(_patient(r) for r in rows), split=None if split is None else tuple(s.lower() for s in split),
                  fold=column("fold"), site=column("site"))
    if task == "survival":
        target, strata = _survival_labels(path, rows, error)
        return Labels(str(path), column("slide_id"), strata, ("censored", "event"), task=task, target=target, **common)
    if task == "regression":
        value = _float(path, rows, "label", error)
        if np.ptp(value) == 0:
            raise error(f"{path}: every label is {value[0]:g}; a regression target must vary")
        return Labels(str(path), column("slide_id"), _strata(value, 4), (), task=task, target=value, **common)
    classes = sort_classes(r["label"] for r in rows)
    if len(classes) < 2:
        raise error(f"{path}: only one class ({classes[0]!r}) in {len(rows)} rows; "
                          "a classifier needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    return Labels(str(path), column("slide_id"), np.array([index[r["label"]] for r in rows], dtype=np.int64),
                  tuple(classes), **common)


LEVELS = ("slide", "patient")


def pool_patients(labels: Labels, *, error: type[Exception] = LabelsError) -> tuple[Labels, dict[str, tuple[str, ...]]]:
    """One row per patient (``--level patient``): the labels of the units a patient-level run trains on.

    Returns the patient table (``slide_ids`` then hold patient ids, rows in first-seen order) and
    each patient's slides in file order. A patient's slides must agree on what is learnt and how
    it is split (label or time/event or target, split, fold, site); a patient whose slides
    disagree is refused in one line naming the patients, since one bag cannot carry two answers.
    """
    members: dict[str, list[int]] = {}
    for i, p in enumerate(labels.patients):
        members.setdefault(p, []).append(i)
    firsts = [rows[0] for rows in members.values()]
    fields = {"label" if labels.target is None else ("time,event" if labels.task == "survival" else "target"):
              (lambda i: labels.y[i]) if labels.target is None else (lambda i: tuple(np.atleast_1d(labels.target[i])))}
    for name in ("split", "fold", "site"):
        col = getattr(labels, name)
        if col is not None:
            fields[name] = col.__getitem__
    for name, get in fields.items():
        mixed = [p for p, rows in members.items() if len({get(i) for i in rows}) > 1]
        if mixed:
            raise error(f"{labels.path}: patient(s) {rows_text(mixed)} have slides with different {name}; "
                        "--level patient pools a patient's slides into one bag with one answer: fix the rows "
                        "or use --level slide")
    pooled = labels.subset(firsts)
    pooled = replace(pooled, slide_ids=tuple(members), patients=tuple(members))
    return pooled, {p: tuple(labels.slide_ids[i] for i in rows) for p, rows in members.items()}


def _one_target(path: Path, rows: Rows, column: str, error: type[Exception]) -> Rows:
    """The rows of a multi-target table as a one-label table: *column* renamed ``label``, the other
    targets dropped, rows without a value for *column* left out (with a warning)."""
    kept = Rows()   # read_table has already refused a missing target column
    kept.columns = tuple(c for c in rows.columns if c not in _target_columns(rows.columns, column)) + ("label",)
    empty = []
    for r in rows:
        if r[column].lower() in NA:
            empty.append(r.line)
            continue
        row = Row({c: r[c] for c in kept.columns if c != "label"})
        row["label"] = r[column]
        row.line = r.line
        kept.append(row)
    if empty:
        log.warning("%s: target %s: %d row(s) without a value left out (line(s) %s)", path, column, len(empty),
                    rows_text(empty))
    if not kept:
        raise error(f"{path}: target {column!r} has no value on any row")
    return kept


def _target_columns(columns: Sequence[str], column: str) -> set[str]:
    """Columns of a multi-target table that are other targets (not id, survival or split columns)."""
    return {c for c in columns if c not in ("slide_id", *SURVIVAL, *OPTIONAL)} | {column}


def match_store(labels: Labels, available: Iterable[str], *, allow_missing: bool = False,
                store_name: str = "the store", error: type[Exception] = LabelsError) -> Labels:
    """Drop (with --allow-missing) or reject slides of *labels* whose features *available* lacks."""
    avail = set(available)
    missing = [s for s in labels.slide_ids if s not in avail]
    if not missing:
        return labels
    if not allow_missing:
        raise error(f"{len(missing)} slide(s) of {labels.path} have no features in {store_name}: "
                          f"{rows_text(missing)}; extract them or pass --allow-missing to skip them")
    log.warning("skipping %d slide(s) without features in %s: %s", len(missing), store_name,
                rows_text(missing))
    kept = labels.subset([i for i, s in enumerate(labels.slide_ids) if s in avail])
    if len(kept) == 0 or (labels.task == "classification" and len(set(kept.y.tolist())) < 2):
        raise error(f"after skipping slides missing from {store_name}, {labels.path} has "
                          f"{len(kept)} slide(s) and fewer than two classes; extract the missing slides")
    return kept


__all__ = ["Labels", "pool_patients", "LEVELS", "Row", "Rows", "read_table", "read_labels", "match_store", "sort_classes", "rows_text",
           "infer_task", "REQUIRED", "OPTIONAL", "SURVIVAL", "TASKS", "SPLIT_VALUES", "NA"]
