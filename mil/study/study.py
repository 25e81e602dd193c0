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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from featstore.core.config import Config, coerce_fields, from_dict, option
from featstore.core.errors import first_line
from mil.study.base import (EncoderPlan, Progress, StudyBase, StudyEvent, StudyForm, StudyResult, at, check_plans,
                            expand_shorthand, resolve, resolve_extract_paths, section, weights_request, with_fields)
from mil.study.errors import StudyError
from mil.study.report import SlideReport, write_report

if TYPE_CHECKING:  # pragma: no cover
    from featstore.config import ExtractConfig
    from featstore.pretrain import PretrainConfig
    from mil.config import FinetuneConfig, TrainConfig

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class SlideSections:
    """The slide study's YAML sections as configs, checked and built once when the file is loaded.

    Each run fills only the fields the study sets (``dataclasses.replace``): the encoder, weights
    and levels of ``extract``, the seed of ``mil``, the encoder of ``pretrain``. ``tiling`` stays
    the file's keys, laid over the store's own tiling when a stage opens the store."""

    tiling: dict
    extract: ExtractConfig
    mil: TrainConfig
    finetune: FinetuneConfig | None
    pretrain: PretrainConfig


@dataclass
class StudyConfig(StudyForm):
    """The YAML file, validated. Relative paths are relative to the YAML's folder.

    ``tiling``, ``extract``, ``mil``, ``finetune`` and ``pretrain`` hold the YAML's keys (what
    study.json records), checked against TilingConfig, ExtractConfig (minus
    :data:`STUDY_SETS_EXTRACT`), TrainConfig (minus ``seed``, which comes from ``seeds``),
    FinetuneConfig (plus ``enabled``) and PretrainConfig (minus ``encoder``: every plan whose
    weights list ``pretrain``) when the file is loaded, and built once into :attr:`sections`;
    :meth:`train_config`, :meth:`extract_config`, :meth:`finetune_config` and
    :meth:`pretrain_config` fill in what one run sets.
    """

    task = "slide"

    slides: list[str]
    labels: str
    encoders: list[EncoderPlan]
    store: str = "cohort.zarr"
    out: str = "study"
    name: str = "study"
    seeds: list[int] = field(default_factory=lambda: [0])
    folds: int | None = None
    split: str = "patient"            # mil train --split: patient | site | site-preserved
    endpoint: str = "auto"            # mil train --task (the YAML's `task: survival` lands here)
    level: str = "slide"              # mil train --level: slide | patient
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

    required = ("slides", "labels", "encoders")

    @classmethod
    def prepare(cls, d: dict) -> dict:
        return expand_shorthand(d)

    @classmethod
    def keywords(cls, kw: dict, root: Path) -> dict:
        kw["slides"] = [resolve(root, s) for s in kw["slides"]]
        kw["labels"] = resolve(root, kw["labels"])
        kw["store"] = resolve(root, kw.get("store", "cohort.zarr"))
        kw["out"] = resolve(root, kw.get("out", "study"))
        kw["external"] = [_external(root, e, i) for i, e in enumerate(kw.get("external", []))]
        kw["extract"] = resolve_extract_paths(root, kw.get("extract", {}))
        return kw

    @classmethod
    def from_yaml(cls, path: str | Path) -> "StudyConfig":
        path = Path(path)
        if not path.is_file():
            raise StudyError(f"{path}: no such study file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise StudyError(f"{path}: not valid YAML ({first_line(exc)})") from None
        if not isinstance(data, dict):
            raise StudyError(f"{path}: a study file is a mapping of keys (slides, labels, encoders, ...)")
        return cls.from_dict(data, path.parent.resolve(), source=str(path))

    def validate(self) -> None:
        """Build every nested config once (:attr:`sections`), so a bad key or value fails now, not
        in each run; the dict sections keep the YAML's keys as checked (e.g. ``lr: "1e-4"``, a
        string to YAML 1.1, becomes 0.0001)."""
        from analysis.compare import parse_baseline
        from featstore.config import ExtractConfig
        from featstore.pretrain import PretrainConfig
        from featstore.tiling import TilingConfig
        from mil.config import FinetuneConfig, TrainConfig

        check_plans(self.encoders, self.seeds)
        if self.split not in ("patient", "site", "site-preserved"):
            raise StudyError(f"split: {self.split!r}; choose patient, site or site-preserved")
        from featstore.core.labels import LEVELS

        if self.level not in LEVELS:
            raise StudyError(f"level: {self.level!r}; choose {' or '.join(LEVELS)}")
        self.endpoint = self._resolve_endpoint()
        from_dict(TilingConfig, self.tiling, where="tiling", error=StudyError)
        first = self.encoders[0]
        ft = dict(self.finetune)
        enabled = ft.pop("enabled", False)
        if not isinstance(enabled, bool):
            raise StudyError(f"finetune.enabled: expected bool, got {enabled!r} ({type(enabled).__name__})")
        finetune = section(FinetuneConfig, {"seed": self.seeds[0], **ft}, "finetune")  # checked even if disabled
        self._sections = SlideSections(
            tiling=coerce_fields(TilingConfig, self.tiling),
            extract=section(ExtractConfig, self.extract, "extract", exclude=STUDY_SETS_EXTRACT,
                            encoder=first.name, weights="random", levels=tuple(first.levels)),
            mil=section(TrainConfig, self.mil, "mil", exclude=("seed",), seed=self.seeds[0]),
            finetune=finetune if enabled else None,
            pretrain=section(PretrainConfig, self.pretrain, "pretrain", exclude=("encoder",), encoder=first.name))
        self.tiling = self._sections.tiling
        self.extract = coerce_fields(ExtractConfig, self.extract)
        self.mil = coerce_fields(TrainConfig, self.mil)
        self.finetune = {**({"enabled": enabled} if "enabled" in self.finetune else {}), **coerce_fields(FinetuneConfig, ft)}
        self.pretrain = coerce_fields(PretrainConfig, self.pretrain, exclude=("encoder",))
        if self.baseline is not None:
            at("baseline", parse_baseline, self.baseline)

    def _resolve_endpoint(self) -> str:
        """The endpoint the labels ask for (``auto``: from the columns, as `mil train` does), and one
        line for what a patient-level study cannot run yet."""
        from featstore.core.labels import TASKS, read_labels

        if self.endpoint not in TASKS:
            raise StudyError(f"task: {self.endpoint!r}; choose {', '.join(t for t in TASKS if t != 'auto')}, "
                             "patch or segmentation (leave it out to read it from the labels' columns)")
        endpoint = self.endpoint
        if Path(self.labels).is_file():
            try:
                endpoint = read_labels(self.labels, task=endpoint).task
            except Exception:  # noqa: BLE001 -- a bad labels file is the train stage's failure to report
                pass
        if self.level == "patient" and self.finetune.get("enabled"):
            raise StudyError("level: patient: top-k fine-tuning takes slide-level runs for now; set "
                             "finetune.enabled: false or use level: slide")
        return endpoint

    def train_config(self, seed: int) -> TrainConfig:
        """The ``mil:`` section's TrainConfig for one seed."""
        return with_fields(self.sections.mil, "mil", seed=seed)

    def extract_config(self, encoder: str, weights: str, levels, tiling=None) -> ExtractConfig:
        """The ``extract:`` section's ExtractConfig for one encoder x weights (tiling: default)."""
        cfg = with_fields(self.sections.extract, "extract", encoder=encoder, weights=weights, levels=tuple(levels))
        return cfg if tiling is None else replace(cfg, tiling=tiling)

    def finetune_config(self) -> FinetuneConfig | None:
        """The ``finetune:`` section's FinetuneConfig (seed: the first study seed), or None if disabled."""
        return self.sections.finetune

    def pretrain_config(self, encoder: str) -> PretrainConfig:
        """The ``pretrain:`` section's PretrainConfig for *encoder*."""
        return with_fields(self.sections.pretrain, "pretrain", encoder=encoder)

    def runner(self, progress: Progress | None = None) -> "Study":
        return Study(self, progress)

    def to_dict(self) -> dict:
        return asdict(self)


def _external(root: Path, c: "ExternalCohort", i: int) -> "ExternalCohort":
    """An ``external:`` entry checked, with its paths resolved against the study file's folder."""
    if not c.name or "/" in c.name or c.name in (".", ".."):
        raise StudyError(f"external[{i}].name: {c.name!r} must be a plain folder name")
    return replace(c, slides=[resolve(root, x) for x in c.slides], labels=resolve(root, c.labels),
                   store=resolve(root, c.store or f"{c.name}.zarr"))


def heatmap_slides(preds: list[dict], classes: list[str], n: int) -> list[str]:
    """The *n* slides a report draws: the most confidently positive slides of the positive class
    (classification), the highest risks (survival) or predictions (regression); a patient-level
    row stands for each of its slides."""
    def key(r: dict):
        if "risk" in r or "prediction" in r:
            return (False, -float(r.get("risk") or r.get("prediction") or 0))
        return (not classes or r.get("label") != classes[-1], -float(r.get("probability") or 0))

    slides = [s for r in sorted(preds, key=key) for s in (r["slides"].split(";") if r.get("slides") else [r["slide_id"]])]
    return slides[:n]


def run_tag(enc: str, weights: str, minus: int, seed: int, frac: float) -> str:
    tag = f"{enc}-{weights}-minus{minus}-seed{seed}"
    return tag + (f"-frac{frac:g}" if frac != 1.0 else "")


class Study(StudyBase):
    """Runs a :class:`StudyConfig`; ``progress`` receives :class:`StudyEvent`s."""

    new_work_keys = ("extracted_tiles", "trained_runs", "finetuned_runs", "pretrained_encoders")

    def __init__(self, cfg: StudyConfig, progress: Progress | None = None):
        super().__init__(cfg, progress)
        self.weights_used: dict[tuple[str, str], str] = {}  # (encoder, requested) -> store tag
        self.pretrained: dict[str, list[str]] = {}          # encoder -> its pretrained checkpoints
        self.labels: dict[tuple[str, str], str] = {}        # (encoder, checkpoint) -> run-name label

    # ------------------------------------------------------------------ helpers
    def plans(self) -> list[tuple[str, str, list[int]]]:
        """(encoder, weights, levels) to extract and train; ``pretrain`` stands for the encoder's
        pretrained checkpoints once :meth:`pretrain` made them (none before)."""
        out = []
        for e in self.cfg.encoders:
            for w in e.weights:
                if w == "pretrain":
                    out += [(e.name, p, e.levels) for p in self.pretrained.get(e.name, [])]
                else:
                    out.append((e.name, weights_request(e.name, w), e.levels))
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
                self.fail("extract", f"{enc}:{w}", exc)
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
                self.fail("pretrain", enc, exc)
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
                               split=self.cfg.split, task=self.cfg.endpoint, level=self.cfg.level,
                               train_fraction=frac, allow_missing=True, overwrite=True)
                train_run(spec, self.cfg.train_config(seed))
                self.new_work["trained_runs"] += 1
            except Exception as exc:  # noqa: BLE001
                self.fail("train", path.name, exc)
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
            self.fail("compare", name, exc)
            rows = compare_runs(run_dirs)
        return rows, write_outputs(rows, self.out / "report" / name)

    def best_frozen(self, rows) -> Any | None:
        cands = [r for r in rows if r.key.kind == "train" and (r.key.train_fraction in (None, 1.0))
                 and r.score is not None]
        return max(cands, key=lambda r: (r.score, -r.key.minus)) if cands else None

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
                self.fail("finetune", out.name, exc)
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
            self.fail("extract fine-tuned", encoder, exc)
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
            self.fail("cka", encoder, exc)
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
        picks = heatmap_slides(read_predictions(run_dir / "predictions.csv"),
                               json.loads((run_dir / "config.json").read_text()).get("classes") or [], n)
        store = open_store(self.cfg.store)
        out = []
        for i, sid in enumerate(picks):
            self.progress(StudyEvent("heatmaps", i, len(picks), sid))
            try:
                src = store.slide_info(sid)["source"]
                png = self.out / "report" / "heatmaps" / f"{sid}.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                make_heatmap(run_dir, src, store, png, slide_id=sid)
                out.append((sid, png))
            except Exception as exc:  # noqa: BLE001
                self.fail("heatmap", sid, exc)
        self.progress(StudyEvent("heatmaps", len(picks), len(picks)))
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
        from mil.evaluate import evaluate_external, summary_columns

        main = open_store(self.cfg.store)
        tiling = TilingConfig.from_dict({**(main.tiling or {}), **self.cfg.tiling}, where="tiling")
        records = []
        runs = [r for r in self.frozen_runs() if r[5] == 1.0 and (r[0] / "metrics.json").exists()]
        for k, coh in enumerate(self.cfg.external):
            try:
                refs = discover_slides(coh.slides)
                store = open_store(coh.store, mode="a")
            except Exception as exc:  # noqa: BLE001 -- a bad external cohort must not stop the study
                self.fail("external", coh.name, exc)
                continue
            for i, (enc, w, levels) in enumerate(self.plans()):
                self.progress(StudyEvent(f"extract {coh.name}", i, len(self.plans()), f"{enc} {w}"))
                try:
                    rep = Extractor(self.cfg.extract_config(enc, w, levels, tiling)).run(refs, store)
                except Exception as exc:  # noqa: BLE001
                    self.fail(f"extract {coh.name}", f"{enc}:{w}", exc)
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
                    self.fail(f"evaluate {coh.name}", path.name, exc)
                    continue
                key, title, _, _ = summary_columns(m)   # auc, c_index or pearson
                records.append({"cohort": coh.name, "run": str(path), "encoder": enc,
                                "weights": self.labels.get((enc, w), w), "minus": lv, "seed": seed,
                                "metric": title,
                                "internal_auc": (m["internal"]["mean"] or {}).get(key),
                                "external_auc": m["external"]["ensemble"].get(key),
                                "external_ci": m["external"]["ensemble"].get(f"{key}_ci"),
                                "n_external": m.get("n_slides")})
            self.progress(StudyEvent(f"evaluate {coh.name}", len(runs), len(runs)))
        return records

    # ------------------------------------------------------------------ everything
    def run(self) -> StudyResult:
        t0 = time.perf_counter()
        (self.out / "report").mkdir(parents=True, exist_ok=True)
        (self.out / "study.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str))
        self.extract()
        self.pretrain()
        self.train()
        frozen_dirs = [r[0] for r in self.frozen_runs()]
        rows, _ = self.compare("frozen", frozen_dirs)
        best = self.best_frozen(rows)
        ft_run = self.finetune(best)
        cka_files = {}
        if ft_run is not None:
            self.compare("finetune", [ft_run])
            if self.cfg.cka:
                tag = self.extract_finetuned(ft_run, best.key.encoder)
                if tag:
                    cka_files = self.cka(best.key.encoder, best.key.weights, tag)
        best_dir = self.run_of(best) if best is not None else None
        heat = self.heatmaps(best_dir) if best_dir is not None else []
        external = self.external()
        self.progress(StudyEvent("report", 0, 1))
        cfg = self.cfg
        report = write_report(SlideReport(
            name=cfg.name, out=self.out, new_work=self.new_work, failures=self.failures,
            seconds=time.perf_counter() - t0, store=cfg.store, labels=cfg.labels,
            plans=[(e, self.weights_used.get((e, w), w), lv) for e, w, lv in self.plans()],   # tags, not paths
            seeds=cfg.seeds, folds=cfg.folds, train_fractions=cfg.train_fractions, extract=cfg.extract,
            weights_used=self.weights_used, baseline_given=bool(cfg.baseline), rows=rows, best=best,
            endpoint=cfg.endpoint, level=cfg.level, slides=list(cfg.slides),
            best_dir=best_dir, ft_run=ft_run, cka_files=cka_files, heatmaps=heat, external_records=external))
        self.progress(StudyEvent("report", 1, 1))
        return self.result(report)
