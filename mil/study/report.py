"""report.md of a study: the answers first, then the tables and pictures behind them.

Each form hands its report an inputs object (:class:`SlideReport`, :class:`PatchReport`,
:class:`SegReport`) holding what the report shows; the report never reaches back into a study,
so the study modules import it and not the other way round.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from analysis.compare import TITLES, format_p

Plan = tuple[str, str, list[int]]   # (encoder, weights, levels)


@dataclass
class ReportInputs:
    """What every form's report states: the study's name and folder, the run's work and failures."""

    name: str
    out: Path
    new_work: dict
    failures: list[dict]          # the report appends its own failures (stain QC) here
    seconds: float
    seeds: list[int] = field(default_factory=list)
    train_fractions: list[float] = field(default_factory=list)

    @property
    def report_dir(self) -> Path:
        return self.out / "report"


@dataclass
class SlideReport(ReportInputs):
    """The slide study's results: the comparison rows and the files of the later stages."""

    store: str = ""
    labels: str = ""
    plans: list[Plan] = field(default_factory=list)
    folds: int | None = None
    extract: dict = field(default_factory=dict)       # the YAML's extract section (the stain note)
    weights_used: dict = field(default_factory=dict)  # (encoder, requested weights) -> store tag
    baseline_given: bool = False
    rows: Sequence = ()
    best: Any = None
    best_dir: Path | None = None
    ft_run: Path | None = None
    cka_files: dict = field(default_factory=dict)
    heatmaps: list = field(default_factory=list)
    external_records: list = field(default_factory=list)
    endpoint: str = "classification"   # classification | survival | regression
    level: str = "slide"
    slides: list = field(default_factory=list)   # slide folders (the viewer command in report.html)


@dataclass
class PatchReport(ReportInputs):
    """The patch study's records and the files `write_study` made of them."""

    images: str = ""
    store: str = ""
    plans: list[Plan] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    finetune: bool = False
    extract: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    files: dict = field(default_factory=dict)


@dataclass
class SegReport(ReportInputs):
    """The segmentation study's datasets and run folders."""

    encoders: list[str] = field(default_factory=list)   # "encoder:weights"
    archs: list[str] = field(default_factory=list)
    seg: dict = field(default_factory=dict)
    baseline: str | None = None
    train_set: Any = None
    ood_sets: list = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def _f(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _clip(x, metric: str = "auc"):
    """Confidence bounds live in the metric's range, [0, 1] or [-1, 1] for a correlation (a
    t-interval of a mean can overshoot)."""
    lo = -1.0 if metric in ("pearson", "spearman") else 0.0
    return None if x is None else min(1.0, max(lo, x))


def _head(rows: Sequence) -> str:
    """The title of the rows' headline metric: AUC, C-index or Pearson r."""
    return TITLES[rows[0].metric] if rows else "AUC"


def _ms(r) -> str:
    """``mean ± sd`` of a row's headline metric."""
    return f"{_f(r.score)} ± {_f(r.score_sd)}"


def _table(rows: Sequence, title: str) -> list[str]:
    h = _head(rows)
    rest = rows[0].metrics[1:] if rows else ("balanced_accuracy", "f1")
    out = [f"| {title} | runs x folds | {h} mean ± sd | 95% CI | " + " | ".join(TITLES[m] for m in rest)
           + f" | Δ {h} vs baseline | p (Welch) |", "|---|---|---|---|" + "---|" * len(rest) + "---|---|"]
    for r in rows:
        name = f"**{r.key.label()}** (baseline)" if r.is_baseline else r.key.label()
        lo, hi = _clip(r.ci[0], r.metric), _clip(r.ci[1], r.metric)
        out.append(
            f"| {name} | {r.n_runs} x {r.n // max(r.n_runs, 1)} | {_ms(r)} | {_f(lo)}–{_f(hi)} | "
            + " | ".join(_f(r.mean.get(m)) for m in rest)
            + f" | {'' if r.delta is None else format(r.delta, '+.3f')} | {format_p(r.p) if r.p is not None else ''} |"
        )
    return out


def _best_per_level(rows: Sequence) -> list[str]:
    """HistoTransfer Table II: per encoder x weights, the headline metric at each truncation level."""
    frozen = [r for r in rows if r.key.kind == "train" and r.key.train_fraction in (None, 1.0)]
    groups: dict[tuple[str, str], dict[int, object]] = {}
    for r in frozen:
        groups.setdefault((r.key.encoder, r.key.weights), {})[r.key.minus] = r
    levels = sorted({lv for g in groups.values() for lv in g})
    out = ["| encoder | weights | " + " | ".join(f"minus{lv}" for lv in levels) + " | best level |",
           "|---|---|" + "---|" * len(levels) + "---|"]
    for (enc, w), g in sorted(groups.items()):
        cells = [_ms(g[lv]) if lv in g else "" for lv in levels]
        best = max(g.values(), key=_score)
        out.append(f"| {enc} | {w} | " + " | ".join(cells) + f" | minus{best.key.minus} |")
    return out


def _fraction_table(rows: Sequence) -> list[str]:
    fr = [r for r in rows if r.key.kind == "train" and r.key.train_fraction is not None]
    fracs = sorted({r.key.train_fraction for r in fr})
    if len(fracs) < 2:
        return []
    groups: dict[tuple, dict[float, object]] = {}
    for r in fr:
        groups.setdefault((r.key.encoder, r.key.weights, r.key.minus), {})[r.key.train_fraction] = r
    out = ["| encoder:weights:level | " + " | ".join(f"{f:g} of training slides" for f in fracs) + " |",
           "|---|" + "---|" * len(fracs)]
    for (enc, w, lv), g in sorted(groups.items()):
        out.append(f"| {enc}:{w}:minus{lv} | " + " | ".join(
            _ms(g[f]) if f in g else "" for f in fracs) + " |")
    return out


def _finetune_section(ft_run: Path, base: Path) -> list[str]:
    from analysis.compare import TASK_METRICS

    m = json.loads((ft_run / "metrics.json").read_text())
    cfg = json.loads((ft_run / "config.json").read_text())
    head, *rest = TASK_METRICS.get(cfg.get("task", "classification"), TASK_METRICS["classification"])
    out = [f"| model | slides | {TITLES[head]} | 95% CI | " + " | ".join(TITLES[k] for k in rest) + " |",
           "|---|---|---|---|" + "---|" * len(rest)]
    for name, block in (("frozen (MIL on stored features)", m.get("frozen", {})), ("top-k fine-tuned", m)):
        for fold, v in (block.get("folds") or {}).items():
            ci = v.get(f"{head}_ci") or [None, None]
            out.append(f"| {name} [{fold}] | {v.get('n', '')} | {_f(v.get(head))} | {_f(ci[0])}–{_f(ci[1])} | "
                       + " | ".join(_f(v.get(k)) for k in rest) + " |")
    extra = []
    if "comparison" in m:
        extra.append(f"Paired comparison on the same slides: {json.dumps(m['comparison'])}")
    keys = ("k", "epochs", "lr", "head_lr", "fold")
    settings = ", ".join(f"{k}={cfg.get(k, cfg.get('finetune', {}).get(k))}" for k in keys)
    return out + ["", f"Fine-tune settings: {settings}. Run: `{_rel(ft_run, base)}`.", *extra]


TIE = 0.0005   # mean AUCs this close print alike (3 decimals): a tie, not a ranking


def _score(r) -> float:
    """The headline metric for ranking (undefined ranks last)."""
    return r.score if r.score is not None else -float("inf")


def _tied(rows: Sequence, top) -> list:
    return [r for r in rows if r is not top and abs(_score(r) - _score(top)) < TIE]


def _best_line(best, frozen: Sequence) -> str:
    line = (f"- **Best frozen configuration:** `{best.key.encoder}` with `{best.key.weights}` weights at "
            f"**minus{best.key.minus}**: {TITLES[best.metric]} {_ms(best)} "
            f"(95% CI {_f(_clip(best.ci[0], best.metric))}–{_f(_clip(best.ci[1], best.metric))}, {best.n} fold results).")
    ties = _tied(frozen, best)
    if ties:
        line += (f" It ties with {len(ties)} other configuration(s) at that {TITLES[best.metric]} "
                 f"({', '.join(f'`{r.key.encoder}:{r.key.weights}:minus{r.key.minus}`' for r in ties[:6])}"
                 f"{' ...' if len(ties) > 6 else ''}); the tie goes to the least truncated network and "
                 "is no evidence that it is better: the task does not separate them.")
    return line


def _truncation_line(enc: str, w: str, rs: Sequence) -> str | None:
    rs = sorted(rs, key=lambda r: r.key.minus)
    full = next((r for r in rs if r.key.minus == 0), None)
    if full is None:
        return None
    top = max(rs, key=_score)
    h = TITLES[top.metric]
    if top.score is None:
        return f"- **Truncation, {enc} ({w}):** no level has a defined {h}."
    tie = [r for r in rs if abs(_score(r) - _score(top)) < TIE]
    if len(tie) > 1:
        levels = ", ".join(f"minus{r.key.minus}" for r in tie)
        return f"- **Truncation, {enc} ({w}):** {levels} tie at {h} {_f(top.score)}: no level is better here."
    if top is not full:
        delta = "" if full.score is None else f" (Δ {top.score - full.score:+.3f})"
        return (f"- **Truncation, {enc} ({w}):** minus{top.key.minus} reaches {h} {_f(top.score)} vs "
                f"{_f(full.score)} for the full network{delta}.")
    return f"- **Truncation, {enc} ({w}):** the full network (minus0) is best, {h} {_f(full.score)}."


def _pretraining_lines(frozen: Sequence) -> list[str]:
    """Per encoder with several weights: the best AUC of each, within that encoder only (an
    encoder's weights are compared with each other, never with another architecture's)."""
    out = []
    for enc in sorted({r.key.encoder for r in frozen}):
        rs = [r for r in frozen if r.key.encoder == enc]
        weights = sorted({r.key.weights for r in rs})
        if len(weights) < 2:
            continue
        best_w = {w: max((r for r in rs if r.key.weights == w), key=_score) for w in weights}
        out.append(f"- **Pre-training, {enc}:** best {TITLES[rs[0].metric]} per weights: " + ", ".join(
            f"`{w}` {_f(r.score)} (minus{r.key.minus})" for w, r in best_w.items()) + ".")
    return out


def _answers(rows: Sequence, best, ft_run: Path | None) -> list[str]:
    if best is None:
        return ["- No MIL run finished; see the failures below."]
    frozen = [r for r in rows if r.key.kind == "train" and r.key.train_fraction in (None, 1.0)]
    a = [_best_line(best, frozen)]
    by_enc: dict[tuple[str, str], list] = {}
    for r in frozen:
        by_enc.setdefault((r.key.encoder, r.key.weights), []).append(r)
    a += [line for (enc, w), rs in sorted(by_enc.items()) if (line := _truncation_line(enc, w, rs))]
    a += _pretraining_lines(frozen)
    if ft_run is not None and (ft_run / "metrics.json").exists():
        m = json.loads((ft_run / "metrics.json").read_text())
        key, h = best.metric, TITLES[best.metric]
        fa, fb = m.get("frozen", {}).get("mean", {}).get(key), m.get("mean", {}).get(key)
        if fa is not None and fb is not None:
            a.append(f"- **Fine-tuning helps?** On the same test slides: frozen {h} {_f(fa)} → fine-tuned {_f(fb)} "
                     f"(Δ {fb - fa:+.3f}). See the fine-tuning table for CIs.")
    a.append("- Differences whose Welch p ≥ 0.05 or whose CIs overlap widely are not evidence of a real "
             "difference on this cohort; add seeds/folds or slides before concluding.")
    return a


def cka_note(csv_path: Path, ft_run: Path | None) -> str:
    """What the CKA picture says: which levels moved, or that fine-tuning barely moved the encoder
    (CKA >= 0.98 at every level between frozen and fine-tuned) and what would move it."""
    import csv

    with Path(csv_path).open(newline="") as fh:
        diag = {int(r["a_minus"]): float(r["cka"]) for r in csv.DictReader(fh) if r["a_minus"] == r["b_minus"]}
    if not diag:
        return ""
    low = min(diag.values())
    if low >= 0.98:
        cfg = json.loads((ft_run / "config.json").read_text()) if ft_run and (ft_run / "config.json").is_file() else {}
        ft = cfg.get("finetune") or cfg
        what = ", ".join(f"{k}={ft[k]}" for k in ("k", "epochs", "lr") if k in ft)
        return (f"**Fine-tuning barely moved the encoder:** CKA between the frozen and the fine-tuned encoder is "
                f"≥ {low:.4f} at every level{f' ({what})' if what else ''}, so the fine-tuned AUC comes from the head "
                "on nearly the same features. More epochs, a larger k or a higher encoder lr would move it.")
    moved = sorted(diag, key=diag.get)[:2]
    return ("Fine-tuning moved " + " and ".join(f"minus{k} (CKA {diag[k]:.3f})" for k in moved) +
            " most; a diagonal near 1 means that block's representation is unchanged.")


def _external_table(records: Sequence[dict]) -> list[str]:
    """Table V rows: per external cohort x configuration, internal and external AUC over seeds."""
    import numpy as np

    if not records:
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["cohort"], r["encoder"], str(r["weights"]), int(r["minus"])), []).append(r)

    def ms(vals) -> str:
        v = [x for x in vals if x is not None]
        if not v:
            return "-"
        return f"{np.mean(v):.3f}" + (f" ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else "")

    h = records[0].get("metric", "AUC")
    rows = [f"| cohort | configuration | seeds | internal {h} | external {h} | drop | external 95 % CI (first seed) | "
            "external slides |", "|---|---|---|---|---|---|---|---|"]
    for (coh, enc, w, lv), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        ia = [r["internal_auc"] for r in rs if r["internal_auc"] is not None]
        ea = [r["external_auc"] for r in rs if r["external_auc"] is not None]
        drop = f"{np.mean(ia) - np.mean(ea):+.3f}" if ia and ea else "-"
        ci = rs[0].get("external_ci") or [None, None]
        ci_s = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and ci[0] is not None else "-"
        rows.append(f"| {coh} | {enc}:{w}:minus{lv} | {len(rs)} | {ms(ia)} | {ms(ea)} | {drop} | {ci_s} | "
                    f"{rs[0].get('n_external', '-')} |")
    return rows


def stain_note(extract: dict) -> str:
    """One sentence on the stain setting of a study's ``extract:`` section."""
    method = (extract or {}).get("stain", "none")
    if method == "none":
        return "Stain: raw tiles (no stain normalisation)."
    return (f"Stain: **{method}** normalisation of every tile before the encoder, fitted to "
            f"`{extract.get('stain_reference')}` ({extract.get('stain_tiles', 32)} tissue tiles if a slide); "
            "features keyed `<weights>-stain-<method>-<hash>`.")


def _stain_section(inputs: SlideReport, store, rep_dir: Path) -> list[str]:
    """The stain note and, with normalisation, the QC picture of the first encoder's features."""
    from featstore.core.errors import first_line

    lines = [stain_note(inputs.extract), ""]
    if (inputs.extract or {}).get("stain", "none") == "none" or not inputs.weights_used:
        return lines
    from featstore.stain.qc import stain_qc

    (enc, _), tag = next(iter(inputs.weights_used.items()))
    level = next(lv for e, w, lv in inputs.plans if e == enc)[0]
    try:
        qc = stain_qc(store, enc, level, tag, rep_dir / "stain-qc.png")
    except Exception as exc:  # noqa: BLE001 -- the QC picture must not cost the report
        inputs.failures.append({"stage": "stain QC", "item": tag, "error": first_line(exc)})
        return lines
    if qc.picture is not None:
        lines += [f"![tiles before and after {qc.method}]({_rel(qc.picture, rep_dir)})", ""]
    lines += ["| slide | angle to the reference's H/E vectors before (°) | after (°) |", "|---|---|---|",
              *[f"| {sid} | {a:.1f} | {b:.1f} |" for sid, (a, b) in qc.angles.items()], ""]
    return lines


_ENDPOINT_NOTE = {"classification": "ranked by AUC", "survival": "ranked by Harrell's C-index; 0.5 is chance",
                  "regression": "ranked by Pearson r; 0 is chance"}


def _best_pictures(best_dir: Path | None, rep_dir: Path) -> list[str]:
    """The best frozen configuration's picture: ROC curves (classification), Kaplan-Meier curves of
    its risk groups with the log-rank p (survival), predicted vs true with the calibration line
    (regression)."""
    if best_dir is None or not (best_dir / "metrics.json").is_file():
        return []
    pooled = json.loads((best_dir / "metrics.json").read_text()).get("pooled") or {}
    if (best_dir / "roc.png").exists():
        return ["## ROC curves of the best frozen configuration", "", f"![ROC]({_rel(best_dir / 'roc.png', rep_dir)})", ""]
    if (best_dir / "km.png").exists():
        p = pooled.get("logrank_p")
        return ["## Kaplan-Meier curves of the best frozen configuration", "",
                "Every fold's test slides, split into high and low risk at their fold model's median risk on its "
                f"own training slides (a cut fixed before the test slides were seen): high risk {pooled.get('n_high')} "
                f"slides ({pooled.get('events_high')} events), low risk {pooled.get('n_low')} slides "
                f"({pooled.get('events_low')} events); log-rank p {format_p(p) if p is not None else 'n/a'}.", "",
                f"![Kaplan-Meier]({_rel(best_dir / 'km.png', rep_dir)})", ""]
    if (best_dir / "scatter.png").exists():
        cal = pooled.get("calibration") or {}
        return ["## Calibration of the best frozen configuration", "",
                f"Every fold's test slides: Pearson r {_f(pooled.get('pearson'))}, R² {_f(pooled.get('r2'))}, "
                f"MAE {_f(pooled.get('mae'))}; calibration line true = {_f(cal.get('intercept'), '.2f')} + "
                f"{_f(cal.get('slope'), '.2f')} × predicted (1 and 0 when calibrated; a slope below 1: predictions "
                f"spread too far), mean error {_f(cal.get('mean_error'), '+.3f')}.", "",
                f"![predicted vs true]({_rel(best_dir / 'scatter.png', rep_dir)})", ""]
    return []


def write_report(r: SlideReport) -> Path:
    """Write ``<out>/report/report.md`` of a slide study and return its path."""
    from featstore.store import open_store

    rows, best, best_dir, ft_run, cka_files, heatmaps = r.rows, r.best, r.best_dir, r.ft_run, r.cka_files, r.heatmaps
    rep_dir = r.report_dir
    rep_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(r.store)
    n_slides = len(store.slide_ids())
    lines = [f"# Transfer-learning study: {r.name}", "",
             f"Cohort: {n_slides} slides in `{r.store}`; labels `{r.labels}`; "
             f"encoders {', '.join(f'{e}:{w} levels {lv}' for e, w, lv in r.plans)}; seeds {r.seeds}; "
             f"{'%d-fold CV' % r.folds if r.folds else 'hold-out split'}; train fractions {r.train_fractions}; "
             f"endpoint **{r.endpoint}** ({_ENDPOINT_NOTE.get(r.endpoint, '')}), one bag per {r.level}. "
             f"This run took {r.seconds:.0f} s and did: {r.new_work}.", "",
             *_stain_section(r, store, rep_dir),
             "## Answers", "", *_answers(rows, best, ft_run), ""]
    base = next((row for row in rows if row.is_baseline), None)
    lines += ["## Table I: every frozen configuration (attention MIL on stored features)", "",
              f"Δ and Welch p are against **{base.key.label()}**"
              + (" (the study's baseline)." if r.baseline_given else " (the best frozen configuration).") if base else "",
              "",
              *_table(rows, "encoder:weights:level kind"), "",
              f"![{_head(rows)} by configuration](frozen/compare.png)", "",
              f"## Table II: {_head(rows)} by truncation level", "", *_best_per_level(rows), ""]
    if ft_run is not None and (ft_run / "metrics.json").exists():
        lines += ["## Table III: frozen vs top-k fine-tuned (same test slides)", "", *_finetune_section(ft_run, rep_dir), ""]
    frac = _fraction_table(rows)
    if frac:
        lines += [f"## Table IV: {_head(rows)} by amount of training data", "", *frac, ""]
    ext = _external_table(r.external_records)
    if ext:
        lines += ["## Table V: internal vs external validation", "",
                  f"Internal: the run's cross-validated test {r.external_records[0].get('metric', 'AUC')} (mean over "
                  "folds). External: the mean of the fold models' predictions on the external cohort, never trained "
                  "on (`mil evaluate`). Both "
                  "are mean ± sd over seeds, and the external 95 % CI is the first seed's bootstrap. Pick an "
                  "encoder by the external column: a large drop means the features learned this site.", "",
                  *ext, ""]
    if cka_files.get("png"):
        lines += ["## CKA: frozen vs fine-tuned encoder, level by level", "",
                  f"![CKA heatmap]({_rel(cka_files['png'], rep_dir)})", "",
                  cka_note(cka_files["csv"], ft_run), "",
                  f"Values: `{_rel(cka_files['csv'], rep_dir)}`. A diagonal near 1 means fine-tuning left that "
                  "block's representation unchanged; low values mark the blocks that moved.", ""]
    lines += _best_pictures(best_dir, rep_dir)
    if heatmaps:
        lines += ["## Attention heatmaps (best frozen configuration)", ""]
        for sid, png in heatmaps:
            lines += [f"### {sid}", "", f"![{sid}]({_rel(png, rep_dir)})", ""]
    fails = list(r.failures) + [{"stage": "extract (store log)", "item": k, "error": v}
                                for k, v in store.failures().items()]
    lines += ["## Failures", ""]
    if fails:
        lines += ["| stage | item | error |", "|---|---|---|"] + [
            f"| {f['stage']} | {f['item']} | {f['error'].replace('|', '/')} |" for f in fails]
    else:
        lines += ["None."]
    lines += ["", "## Files", "", "- `frozen/compare.csv`, `frozen/compare.md`: Table I as data.",
              "- `../runs/*/`: one directory per MIL run (config.json, metrics.json, predictions.csv, plots).",
              "- `../study.json`: the study configuration as run.", ""]
    path = rep_dir / "report.md"
    path.write_text("\n".join(lines))
    write_html(r, "\n".join(lines))
    return path


VIEWER_URL = "http://127.0.0.1:8765/"   # `featstore view`'s default address


def write_html(r: SlideReport, markdown_text: str) -> Path:
    """``report.html`` beside report.md: the same report (Python-Markdown, tables kept), plus a first
    section that links each configuration's run (its first seed) to `featstore view`."""
    import html
    from shlex import quote
    from urllib.parse import urlencode

    runs_dir = r.out / "runs"
    slides = " ".join(f"--slides {quote(str(s))}" for s in r.slides)
    cmd = f"featstore view {quote(str(r.store))} --run {quote(str(runs_dir))} {slides}".strip()
    items = []
    for row in r.rows:
        run = next((Path(p) for p in sorted(row.runs) if Path(p).parent == runs_dir), None)
        if run is not None:
            url = VIEWER_URL + "?" + urlencode({"run": run.name})
            items.append(f'<li><a href="{html.escape(url)}">{html.escape(row.key.label())}</a> '
                         f"(run <code>{html.escape(run.name)}</code>)</li>")
    viewer = (f"<h2>Open the slides in the viewer</h2><p>Start it with <code>{html.escape(cmd)}</code>, then "
              "follow a configuration to see its attention over every slide:</p><ul>" + "".join(items) + "</ul>")
    return write_page(r.report_dir / "report.html", r.name, markdown_text, viewer)


def write_page(path: Path, title: str, markdown_text: str, prefix_html: str = "") -> Path:
    """An HTML page of *markdown_text* (Python-Markdown, tables kept; pictures by their relative
    paths, so it sits beside report.md), after *prefix_html*."""
    import html

    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    style = ("body{font:14px/1.45 sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
             "img{max-width:100%}code{background:#f3f3f3}")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{prefix_html}{body}</body></html>")
    path.write_text(page)
    return path


def _calibration_rows(records: Sequence[dict]) -> list[str]:
    rows = ["| run | accuracy | ECE | T | ECE after T |", "|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["encoder"], str(r["weights"]), r["minus"], r["method"], -r["fraction"])):
        if r["seed"] != min(x["seed"] for x in records) or r["fraction"] != max(x["fraction"] for x in records):
            continue
        rows.append(f"| {r['encoder']}:{r['weights']}:minus{r['minus']} {r['method']} | {_f(r.get('accuracy'))} | "
                    f"{_f(r.get('ece'))} | {_f(r.get('temperature'), '.2f')} | {_f(r.get('ece_after_temperature'))} |")
    return rows


def write_patch_report(r: PatchReport) -> Path:
    """``<out>/report/report.md`` of a ``task: patch`` study (mil.study.patchstudy)."""
    files, rep_dir = r.files, r.report_dir
    rep_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Patch-classification study: {r.name}", "",
             f"Images `{r.images}` in `{r.store}`; encoders "
             f"{', '.join(f'{e}:{w} levels {lv}' for e, w, lv in r.plans)}; methods {r.methods}"
             f"{' + finetune' if r.finetune else ''}; seeds {r.seeds}; training fractions "
             f"{r.train_fractions}. This run took {r.seconds:.0f} s and did: {r.new_work}.", "",
             stain_note(r.extract), ""]
    if files.get("table_md"):
        table = Path(files["table_md"]).read_text().splitlines()
        lines += ["## Table I: every configuration (test split; mean ± sd over seeds, Welch p against random init)",
                  "", *[ln for ln in table if not ln.startswith("# ")], ""]
        for metric in ("balanced_accuracy", "ece"):
            if files.get(f"{metric}_plot"):
                lines += [f"![{metric} vs training fraction]({_rel(Path(files[f'{metric}_plot']), rep_dir)})", ""]
        lines += ["## Calibration (largest fraction, first seed): ECE before and after temperature scaling", "",
                  *_calibration_rows(r.records), "",
                  "Each run's reliability diagram, confidence histograms and confusion matrix are in "
                  "`../patches/runs/<run>/`.", ""]
    return _finish(rep_dir, lines, r.failures)


def _finish(rep_dir: Path, lines: list[str], failures: Sequence[dict]) -> Path:
    """``report.md`` of *lines* and the failures table, and the same as ``report.html``, written to *rep_dir*."""
    path = rep_dir / "report.md"
    text = "\n".join(lines + _failures(failures)) + "\n"
    path.write_text(text)
    write_page(rep_dir / "report.html", lines[0].lstrip("# ") if lines else "report", text)
    return path


def _failures(failures: Sequence[dict]) -> list[str]:
    lines = ["## Failures", ""]
    if failures:
        return lines + ["| stage | item | error |", "|---|---|---|"] + [
            f"| {f['stage']} | {f['item']} | {f['error'].replace('|', '/')} |" for f in failures]
    return lines + ["None."]


def write_seg_report(r: SegReport) -> Path:
    """``<out>/report/report.md`` of a ``task: segmentation`` study (mil.study.segstudy): the init
    table (in-domain beside out-of-domain), Dice vs fraction, the run folders, failures."""
    from mil.seg.compare import compare_seg, read_seg_records

    rep_dir = r.report_dir
    rep_dir.mkdir(parents=True, exist_ok=True)
    ood = ", ".join(f"`{d.source}` (ood:{d.name}, {len(d)} images)" for d in r.ood_sets) or "none"
    lines = [f"# Segmentation-transfer study: {r.name}", "",
             f"Trained on `{r.train_set.source}` ({len(r.train_set)} pairs, {len(r.train_set.data.skipped)} "
             f"skipped); out-of-domain sets {ood}. Encoders "
             f"{', '.join(r.encoders)}; architectures {r.archs}; "
             f"training fractions {r.train_fractions}; seeds {r.seeds}; seg settings {r.seg or 'defaults'}. "
             f"This run took {r.seconds:.0f} s and did: {r.new_work}.", ""]
    if r.run_dirs:
        records = read_seg_records(r.run_dirs)
        files = compare_seg(records, rep_dir, r.baseline)
        table_rows = _csv(files["table_csv"])
        base = next((r["weights"] for r in table_rows if r.get("baseline") == "baseline"), None)
        table = Path(files["table_md"]).read_text().splitlines()
        lines += [f"## Table I: init x architecture x evaluation set x fraction (mean ± sd over seeds, Welch p "
                  f"against {base or 'no baseline'})", "",
                  "`test` is the held-out split of the training images (in-domain); `ood:<name>` the same "
                  "models on another set without retraining.", "",
                  *[ln for ln in table if not ln.startswith("# ")], "",
                  f"![Dice vs training fraction]({_rel(Path(files['dice_plot']), rep_dir)})", "",
                  "Each run's folder (model.pt, config.json, metrics.json with bootstrap CIs over images, overlays "
                  "in pictures/) is under `../seg/runs/`.", ""]
    return _finish(rep_dir, lines, r.failures)


def _csv(path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
