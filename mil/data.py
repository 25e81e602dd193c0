"""Patient-grouped stratified splits of a labels table, and bags of embeddings read from a store.

The labels table itself is :mod:`featstore.core.labels`. Splits never put one patient's slides on both
sides of a train/test (or train/val) boundary; the site modes (leave-one-site-out,
site-preserved K-fold) also keep each site on one side of train/test. Bags come from the store's public read API only
(``Store.features``) and are cached in memory when the cohort fits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from featstore.core.errors import first_line
from featstore.core.labels import Labels, rows_text, sort_classes
from featstore.store import FeatureKey
from mil.errors import LabelsError, MilError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Split:
    """One fold: row indices into the Labels it was made from."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to_dict(self, labels: Labels) -> dict:
        """Slide ids per side; with a site column also ``sites``: the sites on each side."""
        ids = labels.slide_ids
        out: dict = {k: [ids[i] for i in getattr(self, k)] for k in ("train", "val", "test")}
        if labels.site is not None:
            out["sites"] = {k: sort_classes(labels.site[i] for i in getattr(self, k))
                            for k in ("train", "val", "test")}
        return out


def _group_pick(idx: np.ndarray, y: np.ndarray, groups: Sequence[str], frac: float,
                rng: np.random.Generator, *, min_per_class: int, leave_per_class: int) -> np.ndarray:
    """Pick ~frac of the patients of *idx*, stratified by each patient's majority class.

    Per class, between ``min_per_class`` patients and all but ``leave_per_class`` are taken
    (when the class has that many). Returns the picked row indices, sorted.
    """
    by_group: dict[str, list[int]] = {}
    for i in idx:
        by_group.setdefault(groups[i], []).append(int(i))
    names = sorted(by_group)
    g_class = {g: int(np.bincount(y[by_group[g]]).argmax()) for g in names}
    picked: list[int] = []
    for c in sorted(set(g_class.values())):
        gs = [g for g in names if g_class[g] == c]
        gs = [gs[j] for j in rng.permutation(len(gs))]
        n = int(round(frac * len(gs)))
        n = max(n, min(min_per_class, len(gs)))
        n = min(n, max(len(gs) - leave_per_class, 0))
        for g in gs[:n]:
            picked.extend(by_group[g])
    return np.array(sorted(picked), dtype=np.int64)


def carve_val(train: np.ndarray, labels: Labels, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split *train* rows into (train, val) by patient, stratified; val may be empty if too few."""
    if frac <= 0 or len(train) == 0:
        return train, np.array([], dtype=np.int64)
    rng = np.random.default_rng([seed, 1])
    val = _group_pick(train, labels.y, labels.patients, frac, rng, min_per_class=1, leave_per_class=1)
    return np.setdiff1d(train, val), val


def subsample_train(train: np.ndarray, labels: Labels, fraction: float, seed: int) -> np.ndarray:
    """Keep ~fraction of the training patients, stratified, at least one patient per class."""
    if not 0 < fraction <= 1:
        raise MilError(f"--train-fraction {fraction} must lie in (0, 1]")
    if fraction == 1:
        return train
    rng = np.random.default_rng([seed, 2])
    return _group_pick(train, labels.y, labels.patients, fraction, rng, min_per_class=1, leave_per_class=0)


SPLIT_MODES = ("patient", "site", "site-preserved")
SITE_PRESERVED_FOLDS = 3   # K of --split site-preserved when --folds is not given


def make_splits(labels: Labels, *, folds: int | None = None, seed: int = 0, val_fraction: float = 0.2,
                train_fraction: float = 1.0, test_fraction: float = 0.2, split: str = "patient") -> list[Split]:
    """Folds for a labels table.

    ``split="patient"`` (the default):

    * ``folds=K``: patient-grouped stratified K-fold (``fold0..fold{K-1}``);
    * a ``split`` column: one fold ``test`` (rows marked val are the validation set, else it is
      carved from train);
    * a ``fold`` column: one fold per value, named ``fold<value>``;
    * otherwise one patient-grouped stratified hold-out of ~``test_fraction`` named ``test``.

    ``split="site"``: leave-one-site-out, one fold ``site-<name>`` per value of the site column.
    ``split="site-preserved"``: K folds (``folds``, default 3) ``fold0..``, each site wholly in
    one fold, class counts balanced across folds by :func:`assign_sites`.

    The validation set is carved from the training patients first, then ``train_fraction``
    subsamples what is left, so val and test stay the same across fractions for one seed.
    """
    if split not in SPLIT_MODES:
        raise MilError(f"--split {split!r}: choose {', '.join(SPLIT_MODES)}")
    raw = _patient_folds(labels, folds, seed, test_fraction) if split == "patient" else \
        _site_folds(labels, split, folds, seed)
    out = []
    for name, tr, va, te in raw:
        tr = np.sort(tr)
        if va is None:
            tr, va = carve_val(tr, labels, val_fraction, seed)
        tr = subsample_train(tr, labels, train_fraction, seed)
        if labels.task == "classification" and len(set(labels.y[tr].tolist())) < 2:
            raise LabelsError(f"{labels.path}: fold {name} has training slides of one class only; "
                              "add slides of the rarer class or use fewer folds")
        out.append(Split(name, tr, np.sort(va), np.sort(te)))
    _check_no_leak(out, labels, by_site=split != "patient")
    return out


_RawFold = tuple[str, np.ndarray, "np.ndarray | None", np.ndarray]   # name, train, val (None: carve), test


def _patient_folds(labels: Labels, folds: int | None, seed: int, test_fraction: float) -> list[_RawFold]:
    """The folds of ``split="patient"``: a split/fold column, K-fold or one hold-out, by patient."""
    n = len(labels)
    all_idx = np.arange(n)
    raw: list[_RawFold] = []
    if folds is not None and (labels.split is not None or labels.fold is not None):
        col = "split" if labels.split is not None else "fold"
        raise LabelsError(f"{labels.path} has a '{col}' column and --folds {folds} was given; use one of them")
    if labels.split is not None:
        s = np.array(labels.split)
        tr, va, te = all_idx[s == "train"], all_idx[s == "val"], all_idx[s == "test"]
        if len(tr) == 0 or len(te) == 0:
            raise LabelsError(f"{labels.path}: the split column needs both 'train' and 'test' rows")
        raw.append(("test", tr, va if len(va) else None, te))
    elif labels.fold is not None:
        f = np.array(labels.fold)
        values = sort_classes(f.tolist())
        if len(values) < 2:
            raise LabelsError(f"{labels.path}: the fold column has one value ({values[0]}); need >= 2 folds")
        for v in values:
            raw.append((f"fold{v}", all_idx[f != v], None, all_idx[f == v]))
    else:
        k = folds if folds is not None else max(2, int(round(1 / test_fraction)))
        if k < 2:
            raise MilError(f"--folds {k} must be >= 2")
        n_groups = len(set(labels.patients))
        if folds is not None and n_groups < k:
            raise LabelsError(f"{labels.path}: {n_groups} patient(s) cannot make {k} folds; "
                              "lower --folds or add slides")
        k = _folds_the_classes_allow(labels, k, explicit=folds is not None) if labels.task == "classification" \
            else _folds_the_events_allow(labels, k)
        sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        try:
            parts = list(sgkf.split(np.zeros(n), labels.y, groups=np.array(labels.patients)))
        except ValueError as exc:   # scikit-learn's own wording names no file or option
            raise LabelsError(f"{labels.path}: cannot make {k} patient-grouped stratified folds "
                              f"({first_line(exc)}); lower --folds or add slides") from None
        if folds is None:
            tr, te = parts[0]
            raw.append(("test", tr, None, te))
        else:
            raw.extend((f"fold{i}", tr, None, te) for i, (tr, te) in enumerate(parts))
    return raw


def _folds_the_events_allow(labels: Labels, k: int) -> int:
    """*k*, or one line why not: every survival test fold needs an event (a C-index needs one)."""
    if labels.task != "survival":
        return k
    events = int(labels.target[:, 1].sum())
    if events < k:
        raise LabelsError(f"{labels.path}: {events} event(s) among {len(labels)} slides, too few for {k} folds "
                          f"(every test fold needs an event); use --folds {max(events, 2)} or fewer, or add slides")
    return k


def _folds_the_classes_allow(labels: Labels, k: int, *, explicit: bool) -> int:
    """*k*, or why it cannot be: every class needs at least k patients for a stratified K-fold (a
    hold-out of 1/k). An asked-for ``--folds`` above that is refused in one line; the default
    hold-out shrinks to what the rarest class allows (a larger test share), with a warning."""
    patients_of = {c: len({p for p, y in zip(labels.patients, labels.y) if y == i})
                   for i, c in enumerate(labels.classes)}
    rarest, fewest = min(patients_of.items(), key=lambda kv: kv[1])
    if fewest >= k:
        return k
    counts = ", ".join(f"{c}: {m}" for c, m in patients_of.items())
    if fewest < 2:
        raise LabelsError(f"{labels.path}: class {rarest!r} has {fewest} patient(s) ({counts}); a train/test "
                          "split needs at least 2 patients of every class; add slides")
    if explicit:
        raise LabelsError(f"{labels.path}: --folds {k} needs {k} patients of every class, but class {rarest!r} "
                          f"has {fewest} ({counts}); use --folds {fewest} or fewer, or add slides")
    log.warning("%s: class %r has %d patients, too few for a 1/%d hold-out; holding out 1/%d instead",
                labels.path, rarest, fewest, k, fewest)
    return fewest


def _site_folds(labels: Labels, split: str, folds: int | None, seed: int) -> list[_RawFold]:
    """The folds of ``split="site"`` (one per site) or ``"site-preserved"`` (K, sites kept whole)."""
    if labels.site is None:
        raise LabelsError(f"{labels.path}: --split {split} needs a 'site' column (each slide's hospital or "
                          "tissue-source site); add one")
    if labels.split is not None or labels.fold is not None:
        col = "split" if labels.split is not None else "fold"
        raise LabelsError(f"{labels.path} has a '{col}' column and --split {split} was given; use one of them")
    site = np.array(labels.site)
    names = sort_classes(labels.site)
    all_idx = np.arange(len(labels))
    if split == "site":
        if folds is not None:
            raise MilError(f"--folds {folds} does not apply to --split site (one fold per site); drop --folds "
                           "or use --split site-preserved")
        if len(names) < 2:
            raise LabelsError(f"{labels.path}: 1 site ({names[0]}) cannot make leave-one-site-out folds; "
                              "need >= 2 sites")
        return [(f"site-{v}", all_idx[site != v], None, all_idx[site == v]) for v in names]
    k = folds if folds is not None else SITE_PRESERVED_FOLDS
    if k < 2:
        raise MilError(f"--folds {k} must be >= 2")
    if len(names) < k:
        raise LabelsError(f"{labels.path}: {len(names)} sites cannot make {k} site-preserved folds; lower --folds")
    counts = np.stack([np.bincount(labels.y[site == v], minlength=len(labels.classes)) for v in names])
    fold_of = assign_sites(counts, k, seed)
    test_sites = [[v for v, f in zip(names, fold_of) if f == j] for j in range(k)]
    return [(f"fold{j}", all_idx[~np.isin(site, ts)], None, all_idx[np.isin(site, ts)])
            for j, ts in enumerate(test_sites)]


def assign_sites(counts: np.ndarray, k: int, seed: int = 0, *, node_limit: int = 1000) -> np.ndarray:
    """Fold (0..k-1) of each site for site-preserved K-fold, solved as a mixed-integer program.

    *counts* is (sites, classes) slides per class. Every site goes to exactly one fold, no fold
    is empty, and the sum over folds and classes of |slides of the class in the fold - class
    total / k| is minimal (Howard et al. 2021 balance classes across site-preserved folds; an L1
    deviation keeps the program linear for ``scipy.optimize.milp``). Many assignments tie (the
    folds are interchangeable): the sites are offered to the solver in a seeded order, so a seed
    picks one of them, deterministically. Folds are then numbered by their first site. When the
    solver stops at *node_limit* without a proof (many sites), single-site moves and pairwise
    swaps that lower the objective polish its answer.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n_sites = len(counts)
    if n_sites < k:
        raise LabelsError(f"{n_sites} sites cannot make {k} site-preserved folds; lower --folds")
    perm = np.random.default_rng([seed, 4]).permutation(n_sites)
    fold_of = np.empty(n_sites, dtype=np.int64)
    fold_of[perm] = _solve_assignment(counts[perm], k, node_limit)
    if fold_balance(counts, fold_of, k) > _best_possible(counts.sum(0), k).sum() + 1e-9:
        fold_of = _polish(counts, fold_of, k)
    order = {f: j for j, f in enumerate(dict.fromkeys(fold_of.tolist()))}   # first site -> fold0, ...
    return np.array([order[f] for f in fold_of.tolist()], dtype=np.int64)


def _best_possible(totals: np.ndarray, k: int) -> np.ndarray:
    """Per class, the least sum over folds of |count - total/k| integer counts allow: 2r(k-r)/k, r = total mod k."""
    r = np.mod(totals, k)
    return 2 * r * (k - r) / k


def _solve_assignment(counts: np.ndarray, k: int, node_limit: int) -> np.ndarray:
    """The MILP of :func:`assign_sites` (sites in the given order): fold index per site.

    Variables x[s, f] (binary, site s in fold f) at s*k+f and d[c, f] >= |class c in fold f - ideal|
    after them. Site s may only open folds <= s (fold symmetry broken); sum_f d[c, f] is bounded
    below by what integers allow, so a perfectly balanced answer is proven optimal at once.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_sites, n_cls = counts.shape
    nx, nd = n_sites * k, n_cls * k
    ideal = np.repeat(counts.sum(0) / k, k)
    zx, zd = np.zeros((n_cls, nx)), np.zeros((n_sites, nd))
    fold_cls = np.kron(counts.T, np.eye(k))                              # (C*k, nx): class c in fold f
    a = np.block([[np.kron(np.eye(n_sites), np.ones(k)), zd],             # each site in one fold
                  [np.kron(np.ones(n_sites), np.eye(k)), np.zeros((k, nd))],  # no fold empty
                  [fold_cls, -np.eye(nd)],                                # d >= count - ideal
                  [fold_cls, np.eye(nd)],                                 # d >= ideal - count
                  [zx, np.kron(np.eye(n_cls), np.ones(k))]])              # sum_f d >= integer bound
    lo = np.concatenate([np.ones(n_sites), np.ones(k), np.full(nd, -np.inf), ideal,
                         _best_possible(counts.sum(0), k) - 1e-9])
    hi = np.concatenate([np.ones(n_sites), np.full(k, np.inf), ideal, np.full(nd, np.inf), np.full(n_cls, np.inf)])
    x_hi = np.tril(np.ones((n_sites, k))).ravel()                        # x[s, f] = 0 for f > s
    res = milp(np.concatenate([np.zeros(nx), np.ones(nd)]), constraints=LinearConstraint(a, lo, hi),
               integrality=np.concatenate([np.ones(nx), np.zeros(nd)]),
               bounds=Bounds(np.zeros(nx + nd), np.concatenate([x_hi, np.full(nd, np.inf)])),
               options={"node_limit": node_limit, "mip_rel_gap": 1e-6})
    if res.x is None:
        raise LabelsError(f"no site-preserved assignment of {n_sites} sites to {k} folds found "
                          f"({res.message}); lower --folds")
    if res.status != 0:
        log.info("site-preserved folds: the solver stopped after %d nodes (%s); polishing its best answer",
                 node_limit, res.message)
    return res.x[:nx].reshape(n_sites, k).argmax(1)


def _polish(counts: np.ndarray, fold_of: np.ndarray, k: int) -> np.ndarray:
    """Apply the first improving single-site move or two-site swap until none lowers the objective."""
    fold_of = fold_of.copy()
    best = fold_balance(counts, fold_of, k)
    improved = True
    while improved:
        improved = False
        for s in range(len(fold_of)):
            for t in [*((None, f) for f in range(k)), *((u, None) for u in range(s + 1, len(fold_of)))]:
                trial = fold_of.copy()
                if t[0] is None:
                    trial[s] = t[1]
                else:
                    trial[s], trial[t[0]] = fold_of[t[0]], fold_of[s]
                if len(set(trial.tolist())) < k:
                    continue
                value = fold_balance(counts, trial, k)
                if value < best - 1e-9:
                    fold_of, best, improved = trial, value, True
    return fold_of


def fold_balance(counts: np.ndarray, fold_of: np.ndarray, k: int) -> float:
    """The objective of :func:`assign_sites`: sum over folds and classes of |count - total/k|."""
    counts = np.asarray(counts, dtype=np.float64)
    per_fold = np.stack([counts[np.asarray(fold_of) == f].sum(0) for f in range(k)])
    return float(np.abs(per_fold - counts.sum(0) / k).sum())


def _check_no_leak(splits: Sequence[Split], labels: Labels, *, by_site: bool = False) -> None:
    """A patient must sit on one side only; with *by_site*, a site never on both train(+val) and test.

    A split column that breaks the patient rule is a user error; a site rule break cannot come
    from a valid labels file (a patient has one site) and is reported the same way.
    """
    p = np.array(labels.patients)
    for s in splits:
        sides = [set(p[s.train]), set(p[s.val]), set(p[s.test])]
        both = (sides[0] & sides[2]) | (sides[0] & sides[1]) | (sides[1] & sides[2])
        if both:
            raise LabelsError(f"{labels.path}: patient(s) {rows_text(sorted(both))} have slides in more "
                              f"than one of train/val/test in fold {s.name}; fix the split/fold column")
        if by_site and labels.site is not None:
            site = np.array(labels.site)
            shared = set(site[np.concatenate([s.train, s.val])]) & set(site[s.test])
            if shared:
                raise LabelsError(f"{labels.path}: site(s) {rows_text(sorted(shared))} have slides in both "
                                  f"training and test of fold {s.name}; check the site column")


# ----------------------------------------------------------------------------------------- bags
def _available_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass
class Bags:
    """Bags of one cohort, by slide id: ``bags[slide_id]`` -> float32 tensor (N, D).

    ``cache`` is "float32", "float16" (stored as float16, cast per access) or "none" (read from
    the store each time; :meth:`iterate` prefetches in a thread).
    """

    store: object
    key: FeatureKey
    slide_ids: list[str]
    cache: str = "none"
    dim: int = 0
    prefetch: int = 4
    _mem: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    sizes: dict[str, int] = field(default_factory=dict, repr=False)   # tiles per slide

    def size(self, slide_id: str) -> int:
        """Tiles in a slide's bag."""
        if slide_id not in self.sizes:
            self.sizes[slide_id] = int(self[slide_id].shape[0])
        return self.sizes[slide_id]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Bags":
        """In-memory bags (tests, notebooks): {slide_id: (N, D) array}."""
        ids = list(arrays)
        dim = int(np.asarray(arrays[ids[0]]).shape[1]) if ids else 0
        mem = {s: np.ascontiguousarray(a, dtype=np.float32) for s, a in arrays.items()}
        return cls(None, FeatureKey("memory", "memory", 0), ids, cache="float32", dim=dim, _mem=mem,
                   sizes={s: len(a) for s, a in mem.items()})

    def _read(self, slide_id: str) -> np.ndarray:
        k = self.key
        return self.store.features(slide_id, encoder=k.encoder, minus=k.minus, weights=k.weights)

    def _to_tensor(self, a: np.ndarray) -> torch.Tensor:
        """float32 tensor; zero-copy for float32, torch's vectorised cast for float16."""
        a = np.asarray(a)
        if a.dtype == np.float32:
            return torch.from_numpy(a)
        if a.dtype == np.float16 and a.flags.writeable:
            return torch.from_numpy(a).float()
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    def __getitem__(self, slide_id: str) -> torch.Tensor:
        if slide_id in self._mem:
            return self._to_tensor(self._mem[slide_id])
        return self._to_tensor(self._read(slide_id))

    def iterate(self, order: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (slide_id, bag) in *order*; a background thread reads ahead when not cached."""
        if self.cache != "none" or self.prefetch <= 0:
            for s in order:
                yield s, self[s]
            return
        from featstore.read.prefetch import in_thread

        yield from in_thread(((s, self._to_tensor(self._read(s))) for s in order), maxsize=self.prefetch,
                             name="mil-bag-prefetch")


@dataclass
class PatientBags:
    """Bags of patients (``--level patient``): a patient's slides concatenated into one bag.

    Duck-types :class:`Bags` for the trainer and the scorers (``dim``, ``[id]``, ``iterate``), keyed
    by patient id; :meth:`split_attention` cuts a patient's attention back into its slides, rows
    aligned with each slide's store coords, so heatmaps stay per slide.
    """

    slides: Bags
    members: dict[str, tuple[str, ...]]

    @property
    def dim(self) -> int:
        return self.slides.dim

    def __getitem__(self, patient: str) -> torch.Tensor:
        parts = [self.slides[s] for s in self.members[patient]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def iterate(self, order: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(patient, bag) in *order*; the slides are read (ahead) in one stream."""
        stream = self.slides.iterate([s for p in order for s in self.members[p]])
        for p in order:
            parts = [next(stream)[1] for _ in self.members[p]]
            yield p, parts[0] if len(parts) == 1 else torch.cat(parts)

    def split_attention(self, patient: str, attention: np.ndarray | None) -> dict[str, np.ndarray | None]:
        """{slide_id: its rows of the patient's attention} (None for heads without attention)."""
        ids = self.members[patient]
        if attention is None:
            return {s: None for s in ids}
        ends = np.cumsum([self.slides.size(s) for s in ids])
        return dict(zip(ids, np.split(np.asarray(attention), ends[:-1])))


def patient_rows(labels: Labels) -> tuple[Labels, np.ndarray]:
    """(the patient table of :func:`featstore.core.labels.pool_patients`, each label row's row in
    it). Raises the pool's one-line LabelsError when a patient's slides disagree."""
    from featstore.core.labels import pool_patients

    pooled, _ = pool_patients(labels, error=LabelsError)
    row_of = {p: i for i, p in enumerate(pooled.slide_ids)}
    return pooled, np.array([row_of[p] for p in labels.patients], dtype=np.int64)


def patient_means(patient_row: np.ndarray, rows: Sequence[int], preds) -> tuple[np.ndarray, np.ndarray]:
    """Late fusion: (the patient rows of label rows *rows*, each patient's mean of its slides'
    predictions *preds*), patients in row order."""
    groups: dict[int, list] = {}
    for i, pred in zip(rows, preds):
        groups.setdefault(int(patient_row[i]), []).append(pred)
    out = np.array(sorted(groups), dtype=np.int64)
    return out, np.stack([np.mean(np.asarray(groups[r], np.float64), 0) for r in out])


def load_bags(store, slide_ids: Sequence[str], key: FeatureKey, *, cache: str = "auto",
              max_cache_bytes: int | None = None, expected_dim: int | None = None,
              progress=None) -> Bags:
    """Check every slide's features and cache them in memory when the cohort fits.

    *key* must be resolved (``store.resolve_key``) so every slide reads the same weights tag.
    ``cache="auto"`` picks float32 when it fits in ``max_cache_bytes`` (default: half the
    available memory), else float16, else streams from the store. All bags must share one dim
    (and equal *expected_dim* when given), else ``LabelsError``.
    """
    slide_ids = list(slide_ids)
    listed = store.coverage() if len(slide_ids) > 32 else {}  # one listing instead of a read per slide
    sizes = {s: listed[s][0] if s in listed and listed[s][0] is not None else store.n_tiles(s)
             for s in slide_ids}
    first = store.features(slide_ids[0], encoder=key.encoder, minus=key.minus, weights=key.weights)
    dim = int(first.shape[1])
    if expected_dim is not None and dim != expected_dim:
        raise LabelsError(f"features {key.encoder} minus {key.minus} of slide {slide_ids[0]} are "
                          f"{dim}-d but the model expects {expected_dim}-d; use the run's encoder/level")
    n_total = sum(sizes.values())
    budget = max_cache_bytes if max_cache_bytes is not None else _available_memory() // 2
    if cache == "auto":
        cache = ("float32" if n_total * dim * 4 <= budget else
                 "float16" if n_total * dim * 2 <= budget else "none")
    if cache not in ("float32", "float16", "none"):
        raise MilError(f"cache={cache!r}: choose auto, float32, float16 or none")
    log.info("bags: %d slides, %d tiles, dim %d, cache %s (%.1f MiB as float32)", len(slide_ids),
             n_total, dim, cache, n_total * dim * 4 / 2**20)
    bags = Bags(store, key, slide_ids, cache=cache, dim=dim, sizes=dict(sizes))
    bad: list[str] = []
    it = bags.iterate(slide_ids) if cache == "none" else ((s, None) for s in slide_ids)
    for s, t in it:
        if cache != "none":
            a = first if s == slide_ids[0] else bags._read(s)
            shape = a.shape
            bags._mem[s] = np.ascontiguousarray(a, dtype=np.float32 if cache == "float32" else np.float16)
        else:
            shape = tuple(t.shape)
        if len(shape) != 2 or shape[1] != dim or shape[0] != sizes[s]:
            bad.append(f"{s} {tuple(shape)}")
        if progress is not None:
            progress(1)
    if bad:
        raise LabelsError(f"features of the wrong shape (expected (N, {dim}) matching coords) for "
                          f"{len(bad)} slide(s): {rows_text(bad)}; re-extract them")
    if any(n == 0 for n in sizes.values()):
        empty = [s for s, n in sizes.items() if n == 0]
        raise LabelsError(f"slide(s) with no tiles in the store: {rows_text(empty)}; drop them from the labels")
    return bags


__all__ = ["Split", "make_splits", "assign_sites", "fold_balance", "SPLIT_MODES", "carve_val", "subsample_train", "Bags", "PatientBags", "patient_rows", "patient_means", "load_bags"]
