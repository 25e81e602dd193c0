"""A whole transfer-learning study from one YAML file, and its report.

Stages (each skips what is already on disk, so a rerun only does what is missing):

1. extract   every encoder x weights at all its levels, one pass each, into the store
2. train     a `mil train` run per encoder x weights x level x seed x train fraction
3. compare   frozen runs -> table with mean +- sd AUC, delta vs baseline, Welch p
4. finetune  the best frozen configuration (top-k, HistoTransfer), then extract the fine-tuned
             encoder at every level into the store
5. cka       frozen vs fine-tuned encoder, level by level (heatmap)
6. report    report/report.md with tables, CKA heatmap, ROC curves, attention heatmaps

A failure inside one item (a slide, a run) is recorded and reported; the rest goes on.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from study.errors import StudyError

log = logging.getLogger(__name__)


@dataclass
class EncoderPlan:
    """One encoder architecture with the weights and truncation levels to study."""

    name: str
    weights: list[str] = field(default_factory=lambda: ["random"])
    levels: list[int] = field(default_factory=lambda: [0, 1, 2, 3])


@dataclass
class StudyConfig:
    """The YAML file, validated. Relative paths are relative to the YAML's folder."""

    slides: list[str]
    labels: str
    encoders: list[EncoderPlan]
    store: str = "cohort.zarr"
    out: str = "study"
    name: str = "study"
    seeds: list[int] = field(default_factory=lambda: [0])
    folds: int | None = None
    train_fractions: list[float] = field(default_factory=lambda: [1.0])
    tiling: dict = field(default_factory=dict)
    extract: dict = field(default_factory=dict)
    mil: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=lambda: {"enabled": False})
    cka: bool = True
    heatmaps: int = 3
    baseline: str | None = None
    imagenet_if_cached: bool = False  # use imagenet weights where the file is on this machine

    @classmethod
    def from_dict(cls, d: dict, root: Path) -> "StudyConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StudyError(f"study: unknown keys {unknown}; allowed: {sorted(known)}")
        missing = [k for k in ("slides", "labels", "encoders") if k not in d]
        if missing:
            raise StudyError(f"study: missing keys {missing}")
        d = dict(d)
        slides = d["slides"] if isinstance(d["slides"], list) else [d["slides"]]
        d["slides"] = [_resolve(root, s) for s in slides]
        d["labels"] = _resolve(root, d["labels"])
        for k in ("store", "out"):
            if k in d:
                d[k] = _resolve(root, d[k])
        d.setdefault("store", str(root / "cohort.zarr"))
        d.setdefault("out", str(root / "study"))
        encs = []
        for e in d["encoders"]:
            if isinstance(e, str):
                e = {"name": e}
            bad = sorted(set(e) - {"name", "weights", "levels"})
            if bad:
                raise StudyError(f"study: encoder entry {e} has unknown keys {bad}")
            w = e.get("weights", ["random"])
            encs.append(EncoderPlan(e["name"], [w] if isinstance(w, str) else list(w),
                                    [int(x) for x in e.get("levels", [0, 1, 2, 3])]))
        d["encoders"] = encs
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "StudyConfig":
        path = Path(path)
        if not path.is_file():
            raise StudyError(f"{path}: no such study file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise StudyError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise StudyError(f"{path}: a study file is a mapping of keys (slides, labels, encoders, ...)")
        return cls.from_dict(data, path.parent.resolve())

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve(root: Path, p: str) -> str:
    if "://" in str(p):
        return str(p)
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (root / q))


@dataclass
class StudyEvent:
    """Progress of the study: stage name, item k of n, a short text."""

    stage: str
    done: int
    total: int
    text: str = ""


@dataclass
class StudyResult:
    out: Path
    report: Path
    failures: list[dict]
    new_work: dict[str, int]


def run_tag(enc: str, weights: str, minus: int, seed: int, frac: float) -> str:
    tag = f"{enc}-{weights}-minus{minus}-seed{seed}"
    return tag + (f"-frac{frac:g}" if frac != 1.0 else "")


class Study:
    """Runs a :class:`StudyConfig`; ``progress`` receives :class:`StudyEvent`s."""

    def __init__(self, cfg: StudyConfig, progress: Callable[[StudyEvent], None] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.progress = progress or (lambda e: None)
        self.failures: list[dict] = []
        self.new_work = {"extracted_tiles": 0, "trained_runs": 0, "finetuned_runs": 0}
        self.weights_used: dict[tuple[str, str], str] = {}  # (encoder, requested) -> store tag

    # ------------------------------------------------------------------ helpers
    def _fail(self, stage: str, item: str, exc: BaseException) -> None:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("%s %s failed: %s", stage, item, msg)
        log.debug("".join(traceback.format_exception(exc)))
        self.failures.append({"stage": stage, "item": item, "error": msg})

    def _weights(self, enc: str, w: str) -> str:
        if w == "imagenet-or-random":
            from featstore.encoders import find_weights, get_spec

            spec = get_spec(enc)
            ws = spec.weights.get("imagenet")
            return "imagenet" if ws is not None and find_weights(ws) is not None else "random"
        return w

    def plans(self) -> list[tuple[str, str, list[int]]]:
        return [(e.name, self._weights(e.name, w), e.levels) for e in self.cfg.encoders for w in e.weights]

    # ------------------------------------------------------------------ stages
    def extract(self) -> None:
        from featstore.cohort import discover_slides
        from featstore.extract import ExtractConfig, Extractor
        from featstore.store import open_store
        from featstore.tiling import TilingConfig

        refs = discover_slides(self.cfg.slides)
        store = open_store(self.cfg.store, mode="a")
        tiling = TilingConfig.from_dict({**(store.tiling or {}), **self.cfg.tiling}) if (store.tiling or self.cfg.tiling) \
            else TilingConfig()
        plans = self.plans()
        for i, (enc, w, levels) in enumerate(plans):
            self.progress(StudyEvent("extract", i, len(plans), f"{enc} {w} levels {levels}"))
            try:
                ex = Extractor(ExtractConfig(encoder=enc, weights=w, levels=tuple(levels), tiling=tiling,
                                             **self.cfg.extract))
                self.weights_used[(enc, w)] = ex.encoder.weights_tag
                rep = ex.run(refs, store)
            except Exception as exc:  # noqa: BLE001 -- one encoder failing must not stop the study
                self._fail("extract", f"{enc}:{w}", exc)
                continue
            self.new_work["extracted_tiles"] += rep.tiles
            for sid, why in rep.failed.items():
                self.failures.append({"stage": "extract", "item": f"{enc}:{w} slide {sid}", "error": why})
        self.progress(StudyEvent("extract", len(plans), len(plans)))

    def frozen_runs(self) -> list[tuple[Path, str, str, int, int, float]]:
        runs = []
        for enc, w, levels in self.plans():
            for lv in levels:
                for seed in self.cfg.seeds:
                    for frac in self.cfg.train_fractions:
                        runs.append((self.out / "runs" / run_tag(enc, w, lv, seed, frac), enc, w, lv, seed, frac))
        return runs

    def train(self) -> None:
        from mil.train import RunSpec, TrainConfig, train_run

        runs = self.frozen_runs()
        for i, (path, enc, w, lv, seed, frac) in enumerate(runs):
            self.progress(StudyEvent("train", i, len(runs), path.name))
            if (path / "config.json").exists():
                continue
            try:
                spec = RunSpec(store=self.cfg.store, labels=self.cfg.labels, out=str(path), encoder=enc, minus=lv,
                               weights=self.weights_used.get((enc, w), w), folds=self.cfg.folds,
                               train_fraction=frac, allow_missing=True, overwrite=True)
                train_run(spec, TrainConfig(**{**self.cfg.mil, "seed": seed}))
                self.new_work["trained_runs"] += 1
            except Exception as exc:  # noqa: BLE001
                self._fail("train", path.name, exc)
        self.progress(StudyEvent("train", len(runs), len(runs)))

    def compare(self, name: str, run_dirs: list[Path]):
        from analysis.compare import compare_runs, write_outputs

        run_dirs = [p for p in run_dirs if (p / "metrics.json").exists()]
        if not run_dirs:
            return [], {}
        baseline = self.cfg.baseline
        if baseline is None:  # default: every configuration against the best frozen one
            best = self.best_frozen(compare_runs(run_dirs))
            if best is not None:
                baseline = {"encoder": best.key.encoder, "weights": best.key.weights, "minus": best.key.minus,
                            "kind": best.key.kind}
        try:
            rows = compare_runs(run_dirs, baseline=baseline)
        except StudyError as exc:
            self._fail("compare", name, exc)
            rows = compare_runs(run_dirs)
        return rows, write_outputs(rows, self.out / "report" / name)

    def best_frozen(self, rows) -> Any | None:
        cands = [r for r in rows if r.key.kind == "train" and (r.key.train_fraction in (None, 1.0))
                 and r.mean.get("auc") is not None]
        return max(cands, key=lambda r: (r.mean["auc"], -r.key.minus)) if cands else None

    def run_of(self, row) -> Path:
        """The run of a comparison group trained with the study's first seed (else its first run)."""
        paths = [Path(r) for r in row.runs]
        for p in paths:
            cfg = p / "config.json"
            if cfg.exists() and json.loads(cfg.read_text()).get("seed") == self.cfg.seeds[0]:
                return p
        return paths[0]

    def finetune(self, best) -> Path | None:
        ft = dict(self.cfg.finetune or {})
        if not ft.pop("enabled", False) or best is None:
            return None
        from mil.finetune import FinetuneConfig, FinetuneSpec, finetune_run

        parent = self.run_of(best)
        out = self.out / "runs" / f"{parent.name}-ft"
        self.progress(StudyEvent("finetune", 0, 1, out.name))
        if not (out / "config.json").exists():
            try:
                finetune_run(FinetuneSpec(run=str(parent), out=str(out), slides=self.cfg.slides,
                                          store=self.cfg.store, overwrite=True),
                             FinetuneConfig(**{"seed": self.cfg.seeds[0], **ft}))
                self.new_work["finetuned_runs"] += 1
            except Exception as exc:  # noqa: BLE001
                self._fail("finetune", out.name, exc)
                return None
        self.progress(StudyEvent("finetune", 1, 1, out.name))
        return out

    def extract_finetuned(self, ft_run: Path, encoder: str) -> str | None:
        """Extract the fine-tuned encoder at every level of the plan; returns its weights tag."""
        from featstore.cohort import discover_slides
        from featstore.extract import ExtractConfig, Extractor
        from featstore.store import open_store
        from featstore.tiling import TilingConfig

        levels = next(e.levels for e in self.cfg.encoders if e.name == encoder)
        store = open_store(self.cfg.store, mode="a")
        self.progress(StudyEvent("extract fine-tuned", 0, 1, encoder))
        try:
            ex = Extractor(ExtractConfig(encoder=encoder, weights=str(ft_run / "encoder.pt"), levels=tuple(levels),
                                         tiling=TilingConfig.from_dict(store.tiling), **self.cfg.extract))
            rep = ex.run(discover_slides(self.cfg.slides), store)
            self.new_work["extracted_tiles"] += rep.tiles
        except Exception as exc:  # noqa: BLE001
            self._fail("extract fine-tuned", encoder, exc)
            return None
        self.progress(StudyEvent("extract fine-tuned", 1, 1, encoder))
        return ex.encoder.weights_tag

    def cka(self, encoder: str, frozen_w: str, ft_w: str) -> dict[str, Path]:
        from analysis.blockwise import blockwise_cka
        from featstore.store import open_store

        self.progress(StudyEvent("cka", 0, 1, f"{encoder}: {frozen_w} vs {ft_w}"))
        out = self.out / "report"
        try:
            res = blockwise_cka(open_store(self.cfg.store), (encoder, frozen_w), (encoder, ft_w), max_tiles=20000)
            paths = {"csv": res.write_csv(out / "cka.csv"), "png": res.plot(out / "cka.png")}
        except Exception as exc:  # noqa: BLE001
            self._fail("cka", encoder, exc)
            return {}
        self.progress(StudyEvent("cka", 1, 1))
        return paths

    def heatmaps(self, run_dir: Path) -> list[tuple[str, Path]]:
        from featstore.store import open_store
        from mil.heatmap import make_heatmap
        from mil.run import read_predictions

        n = self.cfg.heatmaps
        if n <= 0 or run_dir is None or not (run_dir / "predictions.csv").exists():
            return []
        preds = read_predictions(run_dir / "predictions.csv")
        classes = json.loads((run_dir / "config.json").read_text())["classes"]
        pos = classes[-1]
        preds.sort(key=lambda r: (r["label"] != pos, -float(r.get("probability", 0) or 0)))
        store = open_store(self.cfg.store)
        out = []
        for i, row in enumerate(preds[:n]):
            sid = row["slide_id"]
            self.progress(StudyEvent("heatmaps", i, min(n, len(preds)), sid))
            try:
                src = store.slide_info(sid)["source"]
                png = self.out / "report" / "heatmaps" / f"{sid}.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                make_heatmap(run_dir, src, store, png, slide_id=sid)
                out.append((sid, png))
            except Exception as exc:  # noqa: BLE001
                self._fail("heatmap", sid, exc)
        self.progress(StudyEvent("heatmaps", min(n, len(preds)), min(n, len(preds))))
        return out

    # ------------------------------------------------------------------ everything
    def run(self) -> StudyResult:
        from study.report import write_report

        t0 = time.perf_counter()
        (self.out / "report").mkdir(parents=True, exist_ok=True)
        (self.out / "study.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str))
        self.extract()
        self.train()
        frozen_dirs = [r[0] for r in self.frozen_runs()]
        rows, frozen_files = self.compare("frozen", frozen_dirs)
        best = self.best_frozen(rows)
        ft_run = self.finetune(best)
        cka_files, ft_rows, ft_files = {}, [], {}
        if ft_run is not None:
            ft_rows, ft_files = self.compare("finetune", [ft_run])
            if self.cfg.cka:
                tag = self.extract_finetuned(ft_run, best.key.encoder)
                if tag:
                    cka_files = self.cka(best.key.encoder, best.key.weights, tag)
        best_dir = self.run_of(best) if best is not None else None
        heat = self.heatmaps(best_dir) if best_dir is not None else []
        self.progress(StudyEvent("report", 0, 1))
        report = write_report(self, rows, best, best_dir, ft_run, cka_files, heat, time.perf_counter() - t0)
        self.progress(StudyEvent("report", 1, 1))
        return StudyResult(self.out, report, self.failures, dict(self.new_work))
