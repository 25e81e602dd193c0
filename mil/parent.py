"""The frozen `mil train` run a fine-tune starts from: its store, labels, fold and encoder.

:func:`load_parent` reads the run and checks that everything it refers to is still there (the
store with the run's features, the labels with the run's classes, the fold's slides), each gap
one line; :func:`parent_encoder` rebuilds the exact encoder whose features the run was trained
on (same weights, checked by sha256).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featstore.errors import FeatstoreError, StoreError
from featstore.store import FeatureKey, open_store
from featstore.tags import WeightsTag
from mil.errors import LabelsError, MilError, RunError
from featstore.core.labels import Labels, read_labels
from mil.run import Run, load_run

log = logging.getLogger(__name__)


def parent_weights(run: Run) -> tuple[str, int]:
    """The ``create_encoder`` weights argument (and seed) that rebuild the run's encoder."""
    prov = run.provenance
    text = str(prov.get("weights") or run.config.get("weights") or "")
    tag = WeightsTag.parse(text) if text else None
    kind = prov.get("weights_kind")
    if kind == "random" or (kind is None and tag is not None and tag.kind == "random"):
        seed = prov.get("seed")
        if seed is None:
            seed = tag.seed if tag is not None and tag.kind == "random" and tag.seed is not None else 0
        return "random", int(seed)
    path = prov.get("weights_path")
    if path:
        if not Path(path).is_file():
            raise RunError(f"run {run.path}: its encoder weights file {path} is gone; put it back (the "
                           "fine-tune starts from the encoder the run's features came from)")
        return (f"{text}={path}" if kind == "named" else str(path)), 0
    if kind == "named" or text:
        return text, 0
    raise RunError(f"{run.path / 'model.pt'}: provenance does not say which encoder weights made the features; "
                   "rerun `mil train` on a store written by `featstore extract`")


def parent_encoder(run: Run):
    """The run's encoder (name, weights, level) rebuilt offline; MilError if its sha256 differs."""
    from featstore.encoders import create_encoder

    name, minus = run.config.get("encoder"), run.config.get("minus")
    if name is None or minus is None:
        raise RunError(f"{run.path / 'config.json'} lacks encoder/minus; rerun `mil train`")
    weights, seed = parent_weights(run)
    try:
        enc = create_encoder(str(name), weights, levels=(int(minus),), seed=seed)
    except FeatstoreError as exc:
        raise MilError(f"run {run.path}: cannot rebuild encoder {name} ({exc})") from None
    want = run.provenance.get("weights_sha256")
    if want and enc.weights_sha256 and want != enc.weights_sha256:
        raise MilError(f"run {run.path}: weights {weights} have sha256 {enc.weights_sha256[:12]}... but the run's "
                       f"features came from {want[:12]}...; restore the original weights file")
    return enc


@dataclass
class Parent:
    """The frozen run, its store and the fold being fine-tuned."""

    run: Run
    store: object
    key: FeatureKey
    fold: str
    train: list[str]
    val: list[str]
    test: list[str]
    y: dict[str, int]                   # slide_id -> class index into run.classes (classification)
    labels: Labels | None = None        # the run's labels table
    row: dict[str, int] | None = None   # slide_id -> row of labels

    @property
    def slide_ids(self) -> list[str]:
        return self.train + self.val + self.test

    def rows(self, ids: list[str]) -> np.ndarray:
        """Label rows of *ids* (survival, regression)."""
        return np.array([self.row[s] for s in ids], dtype=np.int64)

    def task(self):
        """The run's survival or regression task fitted on this fold's training slides exactly as
        `mil train` fitted it (same rows: same NLL bins, same target scaling); None for
        classification (whose loss is :func:`mil.bagmodel.backward_bag`)."""
        if self.run.task == "classification":
            return None
        from mil.tasks import make_task

        c = self.run.config
        return make_task(self.labels, self.rows(self.train), survival_loss=c.get("survival_loss", "cox"),
                         time_bins=int(c.get("time_bins", 4)), cox_batch=int(c.get("cox_batch", 16)))


def _fold(run: Run, fold: str | None) -> tuple[str, dict[str, list[str]]]:
    """The fold to fine-tune (default the first) and its train/val/test slide ids."""
    cfg = run.config
    if cfg.get("kind", "train") != "train":
        raise RunError(f"{run.path} is a {cfg.get('kind')!r} run; fine-tune from a `mil train` run")
    splits = cfg.get("splits") or {}
    if not splits:
        raise RunError(f"{run.path / 'config.json'} has no splits; rerun `mil train` with this version")
    fold = fold or run.folds[0]
    if fold not in splits or fold not in run.states:
        raise MilError(f"run {run.path} has no fold {fold!r}; choose one of {', '.join(run.folds)}")
    if len(run.folds) > 1:
        log.warning("run %s has %d folds; fine-tuning fold %s only (--fold picks another)", run.path,
                    len(run.folds), fold)
    return fold, {part: list(splits[fold].get(part, [])) for part in ("train", "val", "test")}


def run_labels_table(run: Run) -> Labels:
    """The run's labels file read as the run read it (its task, its target column)."""
    c = run.config
    return read_labels(c["labels"], error=LabelsError, task=run.task, column=c.get("target", "label"),
                       others=c.get("other_targets") or ())


def _labels(run: Run, need: list[str]) -> tuple[Labels, dict[str, int]]:
    """The run's labels table and {slide_id: its row}; the table must match the run (its classes)
    and hold every slide the fold needs."""
    labels = run_labels_table(run)
    if run.task == "classification" and tuple(labels.classes) != tuple(run.classes):
        raise LabelsError(f"{labels.path}: classes {list(labels.classes)} differ from run {run.path}'s "
                          f"{run.classes}; use the run's labels file")
    row = {s: i for i, s in enumerate(labels.slide_ids)}
    unlabeled = [s for s in need if s not in row]
    if unlabeled:
        raise LabelsError(f"{labels.path} lacks slide(s) {', '.join(unlabeled[:10])} of run {run.path}; "
                          "use the run's labels file")
    return labels, row


def load_parent(run_dir: str | Path, fold: str | None = None, store: str | None = None) -> Parent:
    """Read the run, its store, labels and the fold's split; one-line errors for every gap."""
    run = load_run(run_dir)
    run.require_slide_level("mil finetune")
    fold, ids = _fold(run, fold)
    cfg = run.config
    store_path = store or cfg.get("store")
    try:
        st = open_store(store_path)
    except (FeatstoreError, OSError) as exc:
        raise MilError(f"run {run.path}: cannot open its store {store_path} ({exc}); pass --store") from None
    key = FeatureKey(cfg["encoder"], cfg["weights"], int(cfg["minus"]))
    need = ids["train"] + ids["val"] + ids["test"]
    labels, row = _labels(run, need)
    y = {s: int(labels.y[i]) for s, i in row.items()} if run.task == "classification" else {}
    try:
        missing = [s for s in need if not st.has_features(s, key.encoder, key.minus, key.weights)]
    except StoreError as exc:
        raise MilError(f"{st.path}: {exc}") from None
    if missing:
        raise MilError(f"{st.path} lacks features {key} for slide(s) {', '.join(missing[:10])} of run "
                       f"{run.path}; pass the run's store with --store")
    if not ids["train"]:
        raise MilError(f"run {run.path}: fold {fold} has no training slides")
    return Parent(run, st, key, fold, ids["train"], ids["val"], ids["test"], y, labels, row)


__all__ = ["Parent", "load_parent", "parent_encoder", "parent_weights"]
