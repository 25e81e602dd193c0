"""A patch-classification study over an image store: levels x seeds x training fractions.

For each configuration one run folder: the classifier (a probe on the stored features, or the
encoder fine-tuned end to end) is fitted on a nested subset of the training split, the
validation split picks its hyper-parameter / epoch and fits the temperature, and the test split
is scored -- metrics with bootstrap CIs, calibration before and after temperature scaling,
predictions, confusion matrix, reliability diagram, confidence histograms. The split is one for
every seed and init (``split_seed``), so inits compare on the same test images. A finished run
(same config) is reused, so an interrupted study resumes where it stopped. The study folder
gets the comparison table (Welch p against random init) and the metric-vs-fraction figure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mil.patches.config import PROBES, PatchConfig
from mil.patches.errors import PatchError

log = logging.getLogger(__name__)

Event = Callable[[str, int, int], None]      # (run name, runs done, runs in all)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Cohort:
    """The image table, its features' weights tag per level and the train/val/test split."""

    store: object
    table: object                              # featstore.read.images.ImageTable
    split: dict[str, np.ndarray]
    tags: dict[int, str]
    provenance: dict[int, dict] = field(default_factory=dict)
    groups: np.ndarray | None = None           # group ids when every image has one (grouped splits)


@dataclass
class PatchStudy:
    """What :func:`run_patches` produced: one record per run, and the study's files."""

    records: list[dict]
    files: dict[str, Path]


def load_cohort(store, cfg: PatchConfig) -> Cohort:
    """Open *store*'s image table, resolve the features of every level, split the patches."""
    from featstore import open_store
    from featstore.errors import FeatstoreError
    from featstore.read.images import image_table
    from mil.patches.splits import split_indices

    try:
        st = open_store(store) if isinstance(store, (str, Path)) else store
        table = image_table(st)
        shard = str(table.slide_ids[0])
        tags = {lv: st.resolve_key(cfg.encoder, lv, cfg.weights).weights for lv in cfg.levels}
        prov = {lv: st.provenance(shard, cfg.encoder, lv, tags[lv]) for lv in cfg.levels}
    except FeatstoreError as exc:
        raise PatchError(str(exc)) from None
    groups = table.groups if (table.groups != "").all() else None
    splits = table.splits if (table.splits != "").all() else None
    split = split_indices(table.y, groups, splits, val=cfg.val, test=cfg.test, seed=cfg.split_seed)
    return Cohort(st, table, split, tags, prov, groups)


def run_name(cfg: PatchConfig, tag: str, minus: int, fraction: float, seed: int) -> str:
    return _SAFE.sub("_", f"{cfg.encoder}-{tag}-minus{minus}-{cfg.method}-f{fraction:g}-seed{seed}")


def _logits_probe(cohort: Cohort, cfg: PatchConfig, X: np.ndarray, train: np.ndarray, seed: int):
    from mil.patches.probe import fit_probe

    y, sp = cohort.table.y, cohort.split
    fit = fit_probe(cfg.method, X[train], y[train], X[sp["val"]], y[sp["val"]],
                    n_classes=len(cohort.table.classes), seed=seed)
    return fit.logits(X[sp["val"]]), fit.logits(X[sp["test"]]), {"probe": fit.to_dict()}, None


def _probe_head(cohort: Cohort, X: np.ndarray, train: np.ndarray, seed: int):
    """LP-FT's start: the logreg probe on the stored features *X* of the same training images."""
    from mil.patches.probe import fit_probe

    y, val = cohort.table.y, cohort.split["val"]
    return fit_probe("logreg", X[train], y[train], X[val], y[val], n_classes=len(cohort.table.classes),
                     seed=seed).linear_head()


def _logits_finetune(cohort: Cohort, cfg: PatchConfig, minus: int, X, train: np.ndarray, seed: int, settings,
                     slides):
    from featstore.stain import normaliser_of
    from featstore.tags import WeightsTag
    from mil.patches.finetune import FinetuneSettings, finetune_patches

    settings = settings or FinetuneSettings()
    head = _probe_head(cohort, X, train, seed) if settings.head_init == "probe" else None
    tag = WeightsTag.parse(cohort.tags[minus])
    weights, init_seed = ("random", tag.seed) if tag.kind == "random" else (cfg.weights or tag.weights, None)
    if tag.kind in ("file", "pretrain") and not (cfg.weights and Path(cfg.weights).is_file()):
        raise PatchError(f"--method finetune starts from the features' weights {tag}: pass that weights file "
                         "as --weights so the encoder can be built")
    fit = finetune_patches(cohort.store, cohort.table, {**cohort.split, "train": train}, encoder=cfg.encoder,
                           weights=weights, minus=minus, settings=settings, seed=seed, init_seed=init_seed,
                           preprocessing=cohort.provenance[minus].get("preprocessing"), head=head, slides=slides,
                           stain=normaliser_of(cohort.provenance[minus]))
    extra = {"finetune": {"best_epoch": fit.best_epoch, "history": fit.history,
                          "trained_modules": fit.trained_modules}}
    return fit.logits["val"], fit.logits["test"], extra, fit.model


def evaluate(cohort: Cohort, cfg: PatchConfig, logits_val: np.ndarray, logits_test: np.ndarray,
             seed: int) -> tuple[dict, dict]:
    """Test metrics (before/after temperature scaling) and the arrays the pictures need."""
    from mil.patches.calibration import apply_temperature, fit_temperature, max_softmax, reliability_bins
    from mil.patches.metrics import classification_metrics

    y, sp, classes = cohort.table.y, cohort.split, cohort.table.classes
    yt = y[sp["test"]]
    proba = apply_temperature(logits_test, 1.0)
    m = classification_metrics(yt, proba, classes, n_boot=cfg.n_boot, seed=seed, n_bins=cfg.n_bins)
    conf, pred = max_softmax(proba)
    arrays = {"proba": proba, "bins": reliability_bins(conf, pred == yt, cfg.n_bins), "conf": conf,
              "correct": pred == yt}
    m["temperature"] = None
    if cfg.temperature and len(sp["val"]):
        t = fit_temperature(logits_val, y[sp["val"]])
        proba_t = apply_temperature(logits_test, t)
        conf_t, pred_t = max_softmax(proba_t)
        after = reliability_bins(conf_t, pred_t == yt, cfg.n_bins)
        m.update(temperature=t, ece_after_temperature=after.ece,
                 nll_after_temperature=classification_metrics(yt, proba_t, classes, n_boot=0, n_bins=cfg.n_bins)["nll"])
        arrays.update(proba_t=proba_t, bins_after=after)
    return m, arrays


def _config_doc(cohort: Cohort, cfg: PatchConfig, minus: int, fraction: float, seed: int, n_train: int,
                settings) -> dict:
    from featstore import __version__

    doc = {"kind": "patches", "encoder": cfg.encoder, "weights": cohort.tags[minus], "minus": int(minus),
           "method": cfg.method, "fraction": float(fraction), "seed": int(seed), "split_seed": cfg.split_seed,
           "n_train": int(n_train), "n_val": len(cohort.split["val"]), "n_test": len(cohort.split["test"]),
           "classes": list(cohort.table.classes), "store": str(cohort.store.path), "study": cfg.to_dict(),
           "provenance": cohort.provenance[minus], "featstore_version": __version__}
    if cfg.method == "finetune" and settings is not None:
        doc["finetune_settings"] = dataclasses.asdict(settings)
    return json.loads(json.dumps(doc, default=str))


def _reuse(path: Path, doc: dict) -> dict | None:
    try:
        if json.loads((path / "config.json").read_text()) == doc:
            return json.loads((path / "record.json").read_text())
    except (OSError, ValueError):
        return None
    return None


def _record(doc: dict, metrics: dict) -> dict:
    keep = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict)) or k.endswith("_ci")}
    return {**{k: doc[k] for k in ("encoder", "weights", "minus", "method", "fraction", "seed", "n_train")}, **keep}


def _one(cohort: Cohort, cfg: PatchConfig, out: Path, minus: int, X, fraction: float, seed: int,
         train: np.ndarray, settings, slides) -> dict:
    from mil.patches.outputs import write_run

    path = out / "runs" / run_name(cfg, cohort.tags[minus], minus, fraction, seed)
    doc = _config_doc(cohort, cfg, minus, fraction, seed, len(train), settings)
    rec = _reuse(path, doc)
    if rec is not None:
        return rec
    if cfg.method in PROBES:
        lv, lt, extra, model = _logits_probe(cohort, cfg, X, train, seed)
    else:
        lv, lt, extra, model = _logits_finetune(cohort, cfg, minus, X, train, seed, settings, slides)
    metrics, arrays = evaluate(cohort, cfg, lv, lt, seed)
    rec = _record(doc, metrics)
    write_run(path, cohort, doc, metrics, arrays, extra, rec,
              model.encoder if model is not None and cfg.keep_encoder else None)
    return rec


def _needs_features(cfg: PatchConfig, settings) -> bool:
    """Probes read the stored features; so does fine-tuning whose head starts from the probe."""
    return cfg.method in PROBES or getattr(settings, "head_init", "random") == "probe"


def run_patches(cfg: PatchConfig, store, out: str | Path, *, settings=None, slides: Sequence[str] | None = None,
                on_run: Event | None = None) -> PatchStudy:
    """Every (level, seed, fraction) run of *cfg* on *store* into ``out/runs``, then the
    comparison table and figure in *out* (see the module docstring)."""
    from mil.patches.outputs import write_study
    from mil.patches.splits import nested_fractions

    out = Path(out)
    cohort = load_cohort(store, cfg)
    t = cohort.table
    total = len(cfg.levels) * len(cfg.seeds) * len(cfg.fractions)
    records: list[dict] = []
    for minus in cfg.levels:
        X = t.features(cohort.store, cfg.encoder, minus, cohort.tags[minus]) if _needs_features(cfg, settings) \
            else None
        for seed in cfg.seeds:
            subsets = nested_fractions(cohort.split["train"], t.y, cfg.fractions, groups=cohort.groups, seed=seed)
            for fraction in cfg.fractions:
                records.append(_one(cohort, cfg, out, minus, X, fraction, seed, subsets[fraction], settings, slides))
                if on_run is not None:
                    on_run(run_name(cfg, cohort.tags[minus], minus, fraction, seed), len(records), total)
    return PatchStudy(records, write_study(out, records))


def read_records(paths: Sequence[str | Path]) -> list[dict]:
    """The records of run folders or study folders (their ``runs/*``), for `mil patches compare`."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "record.json").is_file():
            found.append(p / "record.json")
        else:
            found.extend(sorted(p.glob("runs/*/record.json")) or sorted(p.glob("*/record.json")))
    if not found:
        raise PatchError(f"no patch runs (record.json) under {', '.join(map(str, paths))}")
    return [json.loads(f.read_text()) for f in found]


__all__ = ["Cohort", "PatchStudy", "evaluate", "load_cohort", "read_records", "run_name", "run_patches"]
