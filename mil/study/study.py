"""A whole transfer-learning study from one YAML file, and its report.

Stages (each skips what is already on disk, so a rerun only does what is missing):

1. extract   every encoder x weights at all its levels, one pass each, into the store
   pretrain  encoders listing the weights ``pretrain``: self-supervised pretraining on the
             store's tiles (the ``pretrain:`` section), one encoder per fraction, each then
             extracted like any other weights (`featstore pretrain`, docs/pretrain.md)
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from featstore.core.config import Config, coerce_fields, from_dict, option
from featstore.core.errors import CoreError
from mil.study.errors import StudyError

log = logging.getLogger(__name__)


@dataclass
class EncoderPlan(Config):
    """One encoder architecture with the weights and truncation levels to study."""

    config_error = StudyError

    name: str = option(help="Encoder name (see `featstore encoders`).")
    weights: list[str] = option(default_factory=lambda: ["random"], help="Weights tags (or one tag).")
    levels: list[int] = option(default_factory=lambda: [0, 1, 2, 3], help="Truncation levels (minus K).")


@dataclass(frozen=True)
class ExternalCohort(Config):
    """A second cohort (another site or scanner) every frozen run is scored on without retraining."""

    config_error = StudyError

    name: str = option(help="Its name in the report and in each run's external/<name>/ folder.")
    slides: list[str] = option(help="Slide folders (or one folder).")
    labels: str = option(help="Labels CSV slide_id,label[,patient_id][,site].")
    store: str | None = option(None, "Its feature store (default: <name>.zarr beside the study file).")
    allow_missing: bool = option(True, "Skip labelled slides its store lacks (e.g. a corrupt file).")


#: ExtractConfig fields a study sets itself (per encoder plan, and the tiling from ``tiling:``).
STUDY_SETS_EXTRACT = ("encoder", "levels", "weights", "tiling")


@dataclass
class StudyConfig:
    """The YAML file, validated. Relative paths are relative to the YAML's folder.

    ``tiling``, ``extract``, ``mil``, ``finetune`` and ``pretrain`` hold the YAML's keys, checked
    against TilingConfig, ExtractConfig (minus :data:`STUDY_SETS_EXTRACT`), TrainConfig (minus
    ``seed``, which comes from ``seeds``), FinetuneConfig (plus ``enabled``) and PretrainConfig
    (minus ``encoder``: every plan whose weights list ``pretrain``) when the file is loaded;
    :meth:`train_config`, :meth:`extract_config` and :meth:`finetune_config` build the configs.
    """

    slides: list[str]
    labels: str
    encoders: list[EncoderPlan]
    store: str = "cohort.zarr"
    out: str = "study"
    name: str = "study"
    seeds: list[int] = field(default_factory=lambda: [0])
    folds: int | None = None
    split: str = "patient"            # mil train --split: patient | site | site-preserved
    train_fractions: list[float] = field(default_factory=lambda: [1.0])
    tiling: dict = field(default_factory=dict)
    extract: dict = field(default_factory=dict)
    mil: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=lambda: {"enabled": False})
    pretrain: dict = field(default_factory=dict)
    cka: bool = True
    heatmaps: int = 3
    baseline: str | None = None
    imagenet_if_cached: bool = False  # use imagenet weights where the file is on this machine
    external: list[ExternalCohort] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict, root: Path, *, source: str = "study") -> "StudyConfig":
        """Validate every key (nested configs included) and resolve paths against *root*.

        Any problem raises one :class:`StudyError` line ``<source>: <key path>: ...`` before any
        work is done.
        """
        try:
            kw = coerce_fields(cls, _expand_shorthand(d), error=StudyError)
            missing = [k for k in ("slides", "labels", "encoders") if k not in kw]
            if missing:
                raise StudyError(f"missing keys {missing}")
            kw["slides"] = [_resolve(root, s) for s in kw["slides"]]
            kw["labels"] = _resolve(root, kw["labels"])
            kw["store"] = _resolve(root, kw.get("store", "cohort.zarr"))
            kw["out"] = _resolve(root, kw.get("out", "study"))
            kw["external"] = [_external(root, e, i) for i, e in enumerate(kw.get("external", []))]
            kw["extract"] = resolve_extract_paths(root, kw.get("extract", {}))
            cfg = cls(**kw)
            cfg.validate()
        except CoreError as exc:
            raise StudyError(f"{source}: {exc}") from None
        return cfg

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
        return cls.from_dict(data, path.parent.resolve(), source=str(path))

    def validate(self) -> None:
        """Build every nested config once, so a bad key or value fails now, not in each run."""
        from analysis.compare import parse_baseline
        from featstore.config import ExtractConfig
        from featstore.tiling import TilingConfig
        from mil.config import FinetuneConfig, TrainConfig

        check_plans(self.encoders, self.seeds)
        if self.split not in ("patient", "site", "site-preserved"):
            raise StudyError(f"split: {self.split!r}; choose patient, site or site-preserved")
        from_dict(TilingConfig, self.tiling, where="tiling", error=StudyError)
        self.extract_config(self.encoders[0].name, "random", self.encoders[0].levels)
        self.train_config(self.seeds[0])
        self.finetune_config()
        self.pretrain_config(self.encoders[0].name)
        # keep the sections as checked (e.g. lr: "1e-4", a string to YAML 1.1, becomes 0.0001)
        self.tiling = coerce_fields(TilingConfig, self.tiling)
        self.extract = coerce_fields(ExtractConfig, self.extract)
        self.mil = coerce_fields(TrainConfig, self.mil)
        ft = dict(self.finetune)
        enabled = {"enabled": ft.pop("enabled")} if "enabled" in ft else {}
        self.finetune = {**enabled, **coerce_fields(FinetuneConfig, ft)}
        from featstore.pretrain import PretrainConfig

        self.pretrain = coerce_fields(PretrainConfig, self.pretrain, exclude=("encoder",))
        if self.baseline is not None:
            _at("baseline", parse_baseline, self.baseline)

    def train_config(self, seed: int):
        """The ``mil:`` section as a TrainConfig for one seed."""
        from mil.config import TrainConfig

        kw = coerce_fields(TrainConfig, self.mil, where="mil", exclude=("seed",), error=StudyError)
        cfg = from_dict(TrainConfig, {**kw, "seed": seed}, where="mil", error=StudyError)
        _at("mil.device", _check_device, cfg.device)
        return cfg

    def extract_config(self, encoder: str, weights: str, levels, tiling=None):
        """The ``extract:`` section as an ExtractConfig for one encoder x weights (tiling: default)."""
        from featstore.config import ExtractConfig

        kw = coerce_fields(ExtractConfig, self.extract, where="extract", exclude=STUDY_SETS_EXTRACT,
                           error=StudyError)
        cfg = from_dict(ExtractConfig, {**kw, "encoder": encoder, "weights": weights, "levels": tuple(levels)},
                        where="extract", error=StudyError)
        _at("extract.device", _check_device, cfg.device)
        return cfg if tiling is None else replace(cfg, tiling=tiling)

    def finetune_config(self):
        """The ``finetune:`` section as a FinetuneConfig (seed: the first study seed), or None if disabled."""
        from mil.config import FinetuneConfig

        ft = dict(self.finetune)
        enabled = ft.pop("enabled", False)
        if not isinstance(enabled, bool):
            raise StudyError(f"finetune.enabled: expected bool, got {enabled!r} ({type(enabled).__name__})")
        cfg = from_dict(FinetuneConfig, {"seed": self.seeds[0], **ft}, where="finetune", error=StudyError)
        _at("finetune.device", _check_device, cfg.device)
        return cfg if enabled else None

    def pretrain_config(self, encoder: str):
        """The ``pretrain:`` section as a PretrainConfig for *encoder*."""
        from featstore.pretrain import PretrainConfig

        kw = coerce_fields(PretrainConfig, self.pretrain, where="pretrain", exclude=("encoder",), error=StudyError)
        cfg = from_dict(PretrainConfig, {**kw, "encoder": encoder}, where="pretrain", error=StudyError)
        _at("pretrain.device", _check_device, cfg.device)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_extract_paths(root: Path, extract: dict) -> dict:
    """The ``extract:`` section with its file paths (``stain_reference``) relative to the study file."""
    if isinstance(extract, dict) and extract.get("stain_reference"):
        return {**extract, "stain_reference": _resolve(root, str(extract["stain_reference"]))}
    return extract


def _external(root: Path, c: "ExternalCohort", i: int) -> "ExternalCohort":
    """An ``external:`` entry checked, with its paths resolved against the study file's folder."""
    if not c.name or "/" in c.name or c.name in (".", ".."):
        raise StudyError(f"external[{i}].name: {c.name!r} must be a plain folder name")
    return replace(c, slides=[_resolve(root, x) for x in c.slides], labels=_resolve(root, c.labels),
                   store=_resolve(root, c.store or f"{c.name}.zarr"))


def check_plans(encoders: list[EncoderPlan], seeds: list[int]) -> None:
    """Every plan names a known encoder and levels it has; at least one plan and one seed."""
    from featstore.encoders import get_spec

    if not encoders or not seeds:
        raise StudyError("encoders and seeds need at least one entry each")
    for i, plan in enumerate(encoders):
        spec = _at(f"encoders[{i}].name", get_spec, plan.name)
        for lv in plan.levels:
            _at(f"encoders[{i}].levels", spec.check_level, lv)


def weights_request(enc: str, w: str) -> str:
    """A plan's weights as the extractor takes them: ``imagenet-or-random`` becomes ``imagenet``
    where the file is on this machine, else ``random``; anything else is returned as is."""
    if w == "imagenet-or-random":
        from featstore.encoders import find_weights, get_spec

        ws = get_spec(enc).weights.get("imagenet")
        return "imagenet" if ws is not None and find_weights(ws) is not None else "random"
    return w


def _expand_shorthand(d: dict) -> dict:
    """``slides: dir`` -> [dir]; an encoder given by name; ``weights: tag`` -> [tag]."""
    d = dict(d)
    if isinstance(d.get("slides"), str):
        d["slides"] = [d["slides"]]
    if isinstance(d.get("external"), list):
        d["external"] = [{**e, "slides": [e["slides"]]} if isinstance(e, dict) and isinstance(e.get("slides"), str)
                         else e for e in d["external"]]
    if isinstance(d.get("encoders"), list):
        encs = [{"name": e} if isinstance(e, str) else e for e in d["encoders"]]
        d["encoders"] = [{**e, "weights": [e["weights"]]} if isinstance(e, dict) and isinstance(e.get("weights"), str)
                         else e for e in encs]
    return d


def _check_device(name: str) -> None:
    from featstore.core.runtime import resolve_device

    resolve_device(name)


def _at(path: str, check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)``; its one-line error is re-raised as a StudyError prefixed with the key path."""
    try:
        return check(*args)
    except CoreError as exc:
        raise StudyError(f"{path}: {exc}") from None


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
        self.new_work = {"extracted_tiles": 0, "trained_runs": 0, "finetuned_runs": 0, "pretrained_encoders": 0}
        self.weights_used: dict[tuple[str, str], str] = {}  # (encoder, requested) -> store tag
        self.pretrained: dict[str, list[str]] = {}          # encoder -> its pretrained checkpoints
        self.labels: dict[tuple[str, str], str] = {}        # (encoder, checkpoint) -> run-name label

    # ------------------------------------------------------------------ helpers
    def _fail(self, stage: str, item: str, exc: BaseException) -> None:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("%s %s failed: %s", stage, item, msg)
        log.debug("".join(traceback.format_exception(exc)))
        self.failures.append({"stage": stage, "item": item, "error": msg})

    def _weights(self, enc: str, w: str) -> str:
        return weights_request(enc, w)

    def plans(self) -> list[tuple[str, str, list[int]]]:
        """(encoder, weights, levels) to extract and train; ``pretrain`` stands for the encoder's
        pretrained checkpoints once :meth:`pretrain` made them (none before)."""
        out = []
        for e in self.cfg.encoders:
            for w in e.weights:
                if w == "pretrain":
                    out += [(e.name, p, e.levels) for p in self.pretrained.get(e.name, [])]
                else:
                    out.append((e.name, self._weights(e.name, w), e.levels))
        return out

    # ------------------------------------------------------------------ stages
    def extract(self, plans: list[tuple[str, str, list[int]]] | None = None) -> None:
        from featstore.cohort import discover_slides
        from featstore.extract import Extractor
        from featstore.store import open_store
        from featstore.tiling import TilingConfig

        refs = discover_slides(self.cfg.slides)
        store = open_store(self.cfg.store, mode="a")
        tiling = TilingConfig.from_dict({**(store.tiling or {}), **self.cfg.tiling}, where="tiling")
        plans = self.plans() if plans is None else plans
        for i, (enc, w, levels) in enumerate(plans):
            self.progress(StudyEvent("extract", i, len(plans), f"{enc} {self.labels.get((enc, w), w)} levels {levels}"))
            try:
                ex = Extractor(self.cfg.extract_config(enc, w, levels, tiling))
                self.weights_used[(enc, w)] = ex.feature_tag
                rep = ex.run(refs, store)
            except Exception as exc:  # noqa: BLE001 -- one encoder failing must not stop the study
                self._fail("extract", f"{enc}:{w}", exc)
                continue
            self.new_work["extracted_tiles"] += rep.tiles
            for sid, why in rep.failed.items():
                self.failures.append({"stage": "extract", "item": f"{enc}:{w} slide {sid}", "error": why})
        self.progress(StudyEvent("extract", len(plans), len(plans)))

    def pretrain(self) -> None:
        """Pretrain every encoder whose weights list ``pretrain`` on the store's tiles, then
        extract each checkpoint (one per fraction) at the plan's levels."""
        from featstore.pretrain import pretrain

        encs = [e.name for e in self.cfg.encoders if "pretrain" in e.weights]
        for i, enc in enumerate(encs):
            def on_step(subset: str, done: int, total: int, loss: float, enc=enc) -> None:
                self.progress(StudyEvent("pretrain", done, total, f"{enc} {subset} loss {loss:.3f}"))

            try:
                results = pretrain(self.cfg.pretrain_config(enc), self.cfg.store, self.out / "pretrain" / enc,
                                   slides=self.cfg.slides, on_step=on_step)
            except Exception as exc:  # noqa: BLE001 -- the rest of the study goes on without it
                self._fail("pretrain", enc, exc)
                continue
            self.pretrained[enc] = [str(r.path) for r in results]
            for r in results:
                self.labels[(enc, str(r.path))] = f"pretrain-{r.subset}"
            self.new_work["pretrained_encoders"] += sum(1 for r in results if not r.reused)
        planned = [p for p in self.plans() if p[1] in {w for ws in self.pretrained.values() for w in ws}]
        if planned:
            self.extract(planned)

    def frozen_runs(self) -> list[tuple[Path, str, str, int, int, float]]:
        runs = []
        for enc, w, levels in self.plans():
            for lv in levels:
                for seed in self.cfg.seeds:
                    for frac in self.cfg.train_fractions:
                        name = run_tag(enc, self.labels.get((enc, w), w), lv, seed, frac)
                        runs.append((self.out / "runs" / name, enc, w, lv, seed, frac))
        return runs

    def train(self) -> None:
        from mil.config import RunSpec
        from mil.train import train_run

        runs = self.frozen_runs()
        for i, (path, enc, w, lv, seed, frac) in enumerate(runs):
            self.progress(StudyEvent("train", i, len(runs), path.name))
            if (path / "config.json").exists():
                continue
            try:
                spec = RunSpec(store=self.cfg.store, labels=self.cfg.labels, out=str(path), encoder=enc, minus=lv,
                               weights=self.weights_used.get((enc, w), w), folds=self.cfg.folds,
                               split=self.cfg.split,
                               train_fraction=frac, allow_missing=True, overwrite=True)
                train_run(spec, self.cfg.train_config(seed))
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
        cfg = self.cfg.finetune_config()
        if cfg is None or best is None:
            return None
        from mil.config import FinetuneSpec
        from mil.finetune import finetune_run

        parent = self.run_of(best)
        out = self.out / "runs" / f"{parent.name}-ft"
        self.progress(StudyEvent("finetune", 0, 1, out.name))
        if not (out / "config.json").exists():
            try:
                finetune_run(FinetuneSpec(run=str(parent), out=str(out), slides=self.cfg.slides,
                                          store=self.cfg.store, overwrite=True),
                             cfg)
                self.new_work["finetuned_runs"] += 1
            except Exception as exc:  # noqa: BLE001
                self._fail("finetune", out.name, exc)
                return None
        self.progress(StudyEvent("finetune", 1, 1, out.name))
        return out

    def extract_finetuned(self, ft_run: Path, encoder: str) -> str | None:
        """Extract the fine-tuned encoder at every level of the plan; returns its weights tag."""
        from featstore.cohort import discover_slides
        from featstore.extract import Extractor
        from featstore.store import open_store
        from featstore.tiling import TilingConfig

        levels = next(e.levels for e in self.cfg.encoders if e.name == encoder)
        store = open_store(self.cfg.store, mode="a")
        self.progress(StudyEvent("extract fine-tuned", 0, 1, encoder))
        try:
            ex = Extractor(self.cfg.extract_config(encoder, str(ft_run / "encoder.pt"), levels,
                                                   TilingConfig.from_dict(store.tiling)))
            rep = ex.run(discover_slides(self.cfg.slides), store)
            self.new_work["extracted_tiles"] += rep.tiles
        except Exception as exc:  # noqa: BLE001
            self._fail("extract fine-tuned", encoder, exc)
            return None
        self.progress(StudyEvent("extract fine-tuned", 1, 1, encoder))
        return ex.feature_tag

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

    def external(self) -> list[dict]:
        """Extract every plan into each external cohort's store (the main store's tiling, the same
        extract settings) and score every finished frozen run at the full training fraction on it
        (`mil evaluate`; a run already scored on a cohort is read back). One record per run x cohort."""
        if not self.cfg.external:
            return []
        from featstore.cohort import discover_slides
        from featstore.extract import Extractor
        from featstore.store import open_store
        from featstore.tiling import TilingConfig
        from mil.evaluate import evaluate_external

        main = open_store(self.cfg.store)
        tiling = TilingConfig.from_dict({**(main.tiling or {}), **self.cfg.tiling}, where="tiling")
        records = []
        runs = [r for r in self.frozen_runs() if r[5] == 1.0 and (r[0] / "metrics.json").exists()]
        for k, coh in enumerate(self.cfg.external):
            try:
                refs = discover_slides(coh.slides)
                store = open_store(coh.store, mode="a")
            except Exception as exc:  # noqa: BLE001 -- a bad external cohort must not stop the study
                self._fail("external", coh.name, exc)
                continue
            for i, (enc, w, levels) in enumerate(self.plans()):
                self.progress(StudyEvent(f"extract {coh.name}", i, len(self.plans()), f"{enc} {w}"))
                try:
                    rep = Extractor(self.cfg.extract_config(enc, w, levels, tiling)).run(refs, store)
                except Exception as exc:  # noqa: BLE001
                    self._fail(f"extract {coh.name}", f"{enc}:{w}", exc)
                    continue
                self.new_work["extracted_tiles"] += rep.tiles
                self.failures += [{"stage": f"extract {coh.name}", "item": f"{enc}:{w} slide {sid}", "error": why}
                                  for sid, why in rep.failed.items()]
            for i, (path, enc, w, lv, seed, _) in enumerate(runs):
                self.progress(StudyEvent(f"evaluate {coh.name}", i, len(runs), path.name))
                done = path / "external" / coh.name / "metrics.json"
                try:
                    if done.is_file():
                        m = json.loads(done.read_text())
                    else:
                        res = evaluate_external(path, store, coh.labels, name=coh.name,
                                                allow_missing=coh.allow_missing)
                        res.write()
                        m = res.metrics
                        self.new_work["external_evaluations"] = self.new_work.get("external_evaluations", 0) + 1
                except Exception as exc:  # noqa: BLE001
                    self._fail(f"evaluate {coh.name}", path.name, exc)
                    continue
                records.append({"cohort": coh.name, "run": str(path), "encoder": enc,
                                "weights": self.labels.get((enc, w), w), "minus": lv, "seed": seed,
                                "internal_auc": (m["internal"]["mean"] or {}).get("auc"),
                                "external_auc": m["external"]["ensemble"]["auc"],
                                "external_ci": m["external"]["ensemble"].get("auc_ci"),
                                "n_external": m.get("n_slides")})
            self.progress(StudyEvent(f"evaluate {coh.name}", len(runs), len(runs)))
        return records

    # ------------------------------------------------------------------ everything
    def run(self) -> StudyResult:
        from mil.study.report import write_report

        t0 = time.perf_counter()
        (self.out / "report").mkdir(parents=True, exist_ok=True)
        (self.out / "study.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str))
        self.extract()
        self.pretrain()
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
        self.external_records = self.external()
        self.progress(StudyEvent("report", 0, 1))
        report = write_report(self, rows, best, best_dir, ft_run, cka_files, heat, time.perf_counter() - t0)
        self.progress(StudyEvent("report", 1, 1))
        return StudyResult(self.out, report, self.failures, dict(self.new_work))
