"""Score slides of a store with a trained run (k-fold runs: mean of the fold heads' probabilities).

The store must hold the features the run was trained on (same encoder, weights tag, level) and
their provenance must agree with the run's (weights hash, dim, preprocessing, tiling);
otherwise a one-line ``MilError`` says what differs.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from featstore.core.runtime import resolve_device
from featstore.errors import StoreError
from featstore.store import FeatureKey, Store, open_store
from mil.data import load_bags
from mil.errors import MilError
from mil.run import Run, load_run
from mil.scoring import score_bags

log = logging.getLogger(__name__)

# provenance fields that must agree between the run's features and the store's
_MUST_MATCH = ("encoder", "weights", "weights_sha256", "minus", "dim", "preprocessing")
_TILING_KEYS = ("patch_size", "mpp", "overlap")


@dataclass
class Predictions:
    """Per-slide class probabilities (averaged over folds) of one run on one store."""

    slide_ids: list[str]
    probs: np.ndarray            # (n, C)
    classes: list[str]
    folds: list[str]

    @property
    def predicted(self) -> list[str]:
        return [self.classes[i] for i in self.probs.argmax(1)]

    def probability(self) -> np.ndarray:
        """Binary: P(classes[1]); multiclass: P(predicted class)."""
        return self.probs[:, 1] if len(self.classes) == 2 else self.probs.max(1)

    def write_csv(self, path: str | Path) -> Path:
        """slide_id,prediction,probability[,prob_<class>...]"""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        multi = len(self.classes) > 2
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_id", "prediction", "probability"] + ([f"prob_{c}" for c in self.classes] if multi else []))
            for sid, pred, p, row in zip(self.slide_ids, self.predicted, self.probability(), self.probs):
                w.writerow([sid, pred, f"{p:.6f}"] + ([f"{v:.6f}" for v in row] if multi else []))
        return path


#: the predictions.csv column of a survival or regression prediction
VALUE_COLUMN = {"survival": "risk", "regression": "prediction"}


@dataclass
class ValuePredictions:
    """Per-slide risk (survival) or predicted value (regression), the mean over the fold heads."""

    slide_ids: list[str]
    values: np.ndarray           # (n,)
    task: str
    folds: list[str]

    @property
    def column(self) -> str:
        return VALUE_COLUMN[self.task]

    def write_csv(self, path: str | Path) -> Path:
        """slide_id,risk (survival) or slide_id,prediction (regression)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_id", self.column])
            for sid, v in zip(self.slide_ids, self.values):
                w.writerow([sid, f"{v:.6g}"])
        return path


def fold_values(run: Run, bags, ids: Sequence[str], device, progress: Callable[[int], None] | None = None
                ) -> dict[str, np.ndarray]:
    """Each fold head's prediction (n,) of a survival or regression run on *ids*
    (:func:`mil.tasks.predictions_of` with the fold's saved task_config)."""
    from mil.scoring import bag_outputs
    from mil.tasks import predictions_of

    configs = run.config.get("task_config") or {}
    out = {}
    for fold, model in run.models().items():
        raw, _ = bag_outputs(model.to(device), bags, ids, device)
        out[fold] = predictions_of(run.task, configs.get(fold, {}), raw)
        if progress is not None:
            progress(1)
    return out


def run_key(run: Run) -> FeatureKey:
    """The store key a run was trained on."""
    c = run.config
    try:
        # a fine-tune run's head reads the fine-tuned encoder's features (extracted with encoder.pt)
        return FeatureKey(c["encoder"], c.get("features_weights") or c["weights"], int(c["minus"]))
    except KeyError as exc:
        raise MilError(f"{run.path / 'config.json'} lacks {exc.args[0]!r}; rerun `mil train`") from None


def check_store(run: Run, store: Store, key: FeatureKey, slide_ids: Sequence[str]) -> None:
    """Raise MilError when the store's features for *key* are not those the run was trained on."""
    tiling_run = (run.provenance.get("tiling") or {})
    tiling_store = store.tiling or {}
    diff = [f"tiling.{k}: run {tiling_run[k]!r} vs store {tiling_store[k]!r}" for k in _TILING_KEYS
            if k in tiling_run and k in tiling_store and tiling_run[k] != tiling_store[k]]
    if slide_ids:
        prov = store.provenance(slide_ids[0], key.encoder, key.minus, key.weights)
        finetuned = run.config.get("kind") == "finetune"
        for k in _MUST_MATCH:
            if finetuned and k.startswith("weights"):
                continue  # checked through the features_weights tag, which carries the file's sha
            a, b = run.provenance.get(k), prov.get(k)
            if a is not None and b is not None and a != b:
                diff.append(f"{k}: run {a!r} vs store {b!r}")
    if diff:
        raise MilError(f"{store.path}: features {key} differ from those run {run.path} was trained on "
                       f"({'; '.join(diff)}); re-extract with the run's settings")


def predict(run: str | Path | Run, store: str | Store, slide_ids: Sequence[str] | None = None, *,
            device: str = "cpu", progress: Callable[[int], None] | None = None) -> "Predictions | ValuePredictions":
    """Class probabilities of *slide_ids* (default: every store slide with the run's features);
    for a survival or regression run the risk or predicted value (:class:`ValuePredictions`)."""
    dev = resolve_device(device)   # a bad --device fails before any work
    run = run if isinstance(run, Run) else load_run(run)
    run.require_slide_level("mil predict")
    st = store if isinstance(store, Store) else open_store(store)
    key = run_key(run)
    try:
        st.resolve_key(key.encoder, key.minus, key.weights)
        have = [s for s in st.slide_ids() if st.has_features(s, key.encoder, key.minus, key.weights)]
    except StoreError as exc:
        raise MilError(f"{st.path} cannot serve run {run.path}: {exc}") from None
    if not have:
        stored = ", ".join(str(k) for k in st.encoders()) or "none"
        raise MilError(f"{st.path} has no features {key} that run {run.path} needs (stored: {stored}); "
                       f"run `featstore extract --encoder {key.encoder} --minus {key.minus} --weights {key.weights}`")
    if slide_ids:
        have_set = set(have)
        missing = [s for s in slide_ids if s not in have_set]
        if missing:
            raise MilError(f"{st.path}: no features {key} for slide(s) {', '.join(missing[:10])}"
                           f"{' ...' if len(missing) > 10 else ''}; check --slides or extract them")
        ids = list(slide_ids)
    else:
        ids = have
    check_store(run, st, key, ids)
    bags = load_bags(st, ids, key, expected_dim=int(run.model_config["in_dim"]))
    if run.task != "classification":
        values = fold_values(run, bags, ids, dev, progress)
        return ValuePredictions(ids, np.mean(np.stack(list(values.values())), 0), run.task, run.folds)
    total = np.zeros((len(ids), len(run.classes)))
    for fold, model in run.models().items():
        probs, _ = score_bags(model.to(dev), bags, ids, dev)
        total += probs
        if progress is not None:
            progress(1)
    return Predictions(ids, total / len(run.folds), list(run.classes), run.folds)


def slide_attention(run: Run, store: Store, slide_id: str, *, device: str = "cpu") -> dict[str, np.ndarray]:
    """Raw (pre-softmax) attention of every fold head on one slide, rows aligned with coords."""
    dev = resolve_device(device)
    key = run_key(run)
    check_store(run, store, key, [slide_id])
    bag = torch.from_numpy(np.asarray(store.features(slide_id, key.encoder, key.minus, key.weights),
                                      dtype=np.float32))
    if bag.shape[1] != int(run.model_config["in_dim"]):
        raise MilError(f"{store.path}: features of {slide_id} are {bag.shape[1]}-d but run {run.path} "
                       f"expects {run.model_config['in_dim']}-d")
    out = {}
    for fold, model in run.models().items():
        _, attn = score_bags(model.to(dev), {slide_id: bag}, [slide_id], dev)
        if attn[slide_id] is None:
            raise MilError(f"run {run.path} uses model {run.model_config.get('name')!r}, which has no "
                           "attention; heatmaps need abmil, abmil-gated or max")
        out[fold] = attn[slide_id]
    return out
