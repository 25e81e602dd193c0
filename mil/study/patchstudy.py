"""The patch form of a study (``task: patch``): labelled images -> image store -> probes and
fine-tuning over encoders x weights x levels x training fractions x seeds -> one report.

    task: patch
    images: NCT-CRC-HE/            # ImageFolder (<class>/<image>) or a CSV path,label[,split][,group]
    store: crc.zarr
    encoders:
      - {name: resnet18, weights: [random, imagenet-or-random], levels: [0, 1, 2]}
    seeds: [0, 1, 2]
    train_fractions: [0.01, 0.1, 1.0]
    methods: [logreg, knn]          # probes on the stored features
    patches: {val: 0.15, test: 0.2} # PatchConfig fields (split, calibration, bootstrap)
    finetune: {enabled: true, epochs: 5, levels: [0]}   # FinetuneSettings fields

Stages: extract (every encoder x weights at its levels, one pass each; a bad image is logged
and skipped), probe (`mil patches probe` per method), finetune (`mil patches finetune`),
report (the comparison table with Welch p against random init, the metric-vs-fraction figure,
calibration before/after temperature). Reruns reuse what is on disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from featstore.core.config import coerce_fields, from_dict
from featstore.core.errors import CoreError
from mil.study.errors import StudyError
from mil.study.study import EncoderPlan, StudyEvent, _at, _resolve, check_plans, resolve_extract_paths

#: PatchConfig fields the study sets itself (from encoders, train_fractions, seeds, methods).
STUDY_SETS = ("encoder", "levels", "weights", "method", "fractions", "seeds")


@dataclass
class PatchStudyConfig:
    """The ``task: patch`` YAML, validated (paths relative to the YAML's folder)."""

    images: str
    encoders: list[EncoderPlan]
    task: str = "patch"
    store: str = "patches.zarr"
    out: str = "study"
    name: str = "patch study"
    seeds: list[int] = field(default_factory=lambda: [0])
    train_fractions: list[float] = field(default_factory=lambda: [1.0])
    methods: list[str] = field(default_factory=lambda: ["logreg"])
    shard_size: int = 1024
    extract: dict = field(default_factory=dict)
    patches: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=lambda: {"enabled": False})

    @classmethod
    def from_dict(cls, d: dict, root: Path, *, source: str = "study") -> "PatchStudyConfig":
        try:
            kw = coerce_fields(cls, d, error=StudyError)
            missing = [k for k in ("images", "encoders") if k not in kw]
            if missing:
                raise StudyError(f"missing keys {missing}")
            kw["encoders"] = [e if isinstance(e, EncoderPlan) else from_dict(EncoderPlan, e, where=f"encoders[{i}]",
                                                                                 error=StudyError)
                              for i, e in enumerate(kw["encoders"])]
            for k, default in (("images", None), ("store", "patches.zarr"), ("out", "study")):
                kw[k] = _resolve(root, kw.get(k, default))
            kw["extract"] = resolve_extract_paths(root, kw.get("extract", {}))
            cfg = cls(**kw)
            cfg.validate()
        except CoreError as exc:
            raise StudyError(f"{source}: {exc}") from None
        return cfg

    def validate(self) -> None:
        if self.task != "patch":
            raise StudyError(f"task: {self.task!r}; this form is task: patch")
        check_plans(self.encoders, self.seeds)
        for m in self.methods:
            _at("methods", self.patch_config, self.encoders[0].name, [0], None, m)
        self.finetune_settings()
        self.extract_config(self.encoders[0].name, "random", self.encoders[0].levels)

    def patch_config(self, encoder: str, levels, weights: str | None, method: str):
        from mil.patches.config import PatchConfig

        kw = coerce_fields(PatchConfig, self.patches, where="patches", exclude=STUDY_SETS, error=StudyError)
        return from_dict(PatchConfig, {**kw, "encoder": encoder, "levels": tuple(levels), "weights": weights,
                                       "method": method, "fractions": tuple(self.train_fractions),
                                       "seeds": tuple(self.seeds)}, where="patches", error=StudyError)

    def finetune_settings(self):
        """(FinetuneSettings, levels or None) when ``finetune.enabled``, else None."""
        from mil.patches.finetune import FinetuneSettings

        ft = dict(self.finetune)
        enabled, levels = ft.pop("enabled", False), ft.pop("levels", None)
        if not isinstance(enabled, bool):
            raise StudyError(f"finetune.enabled: expected bool, got {enabled!r}")
        settings = from_dict(FinetuneSettings, ft, where="finetune", error=StudyError)
        return (settings, levels) if enabled else None

    def extract_config(self, encoder: str, weights: str, levels):
        from featstore.config import ExtractConfig

        return from_dict(ExtractConfig, {**self.extract, "encoder": encoder, "weights": weights,
                                         "levels": tuple(levels)}, where="extract", error=StudyError)


@dataclass
class PatchStudyResult:
    out: Path
    report: Path
    failures: list[dict]
    new_work: dict


class PatchStudy:
    """Runs a :class:`PatchStudyConfig`'s stages (module docstring)."""

    def __init__(self, cfg: PatchStudyConfig, progress: Callable[[StudyEvent], None] | None = None):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.progress = progress or (lambda e: None)
        self.failures: list[dict] = []
        self.new_work = {"extracted_images": 0, "patch_runs": 0}
        self.records: list[dict] = []

    def _fail(self, stage: str, item: str, exc: BaseException) -> None:
        self.failures.append({"stage": stage, "item": item, "error": str(exc).splitlines()[0] if str(exc) else
                              type(exc).__name__})

    def plans(self) -> list[tuple[str, str, list[int]]]:
        from mil.study.study import weights_request

        return [(e.name, weights_request(e.name, w), e.levels) for e in self.cfg.encoders for w in e.weights]

    def extract(self) -> dict[tuple[str, str], str]:
        from featstore.extract import Extractor
        from featstore.read.images import discover_images

        refs, tags = discover_images(self.cfg.images, self.cfg.shard_size), {}
        for i, (enc, w, levels) in enumerate(self.plans()):
            self.progress(StudyEvent("extract", i, len(self.plans()), f"{enc} {w}"))
            try:
                ex = Extractor(self.cfg.extract_config(enc, w, levels))
                rep = ex.run(refs, self.cfg.store)
            except Exception as exc:  # noqa: BLE001 -- one encoder failing must not stop the study
                self._fail("extract", f"{enc}:{w}", exc)
                continue
            tags[(enc, w)] = ex.feature_tag
            self.new_work["extracted_images"] += rep.tiles
            self.failures += [{"stage": "extract", "item": f"{enc}:{w} {sid}", "error": why}
                              for sid, why in rep.failed.items()]
        return tags

    def _runs(self, stage: str, jobs: list[tuple]) -> None:
        from mil.patches.run import run_patches

        for i, (cfg, settings) in enumerate(jobs):
            self.progress(StudyEvent(stage, i, len(jobs), f"{cfg.encoder} {cfg.weights} {cfg.method}"))
            try:
                res = run_patches(cfg, self.cfg.store, self.out / "patches", settings=settings)
            except Exception as exc:  # noqa: BLE001
                self._fail(stage, f"{cfg.encoder}:{cfg.weights}:{cfg.method}", exc)
                continue
            self.records += res.records
        self.progress(StudyEvent(stage, len(jobs), len(jobs)))

    def run(self) -> PatchStudyResult:
        from mil.patches.outputs import write_study
        from mil.study.report import write_patch_report

        t0 = time.perf_counter()
        tags = self.extract()
        probes = [(self.cfg.patch_config(enc, levels, tags[(enc, w)], m), None)
                  for enc, w, levels in self.plans() if (enc, w) in tags for m in self.cfg.methods]
        self._runs("probe", probes)
        ft = self.cfg.finetune_settings()
        if ft is not None:
            settings, levels = ft
            jobs = [(self.cfg.patch_config(enc, levels or lv[:1], w if Path(w).is_file() else tags[(enc, w)],
                                           "finetune"), settings)
                    for enc, w, lv in self.plans() if (enc, w) in tags]
            self._runs("finetune", jobs)
        self.new_work["patch_runs"] = len(self.records)
        files = write_study(self.out / "report", self.records) if self.records else {}
        report = write_patch_report(self, files, time.perf_counter() - t0)
        return PatchStudyResult(self.out, report, self.failures, self.new_work)


def load_study(path: str | Path):
    """The study of a YAML file: :class:`PatchStudyConfig` for ``task: patch``,
    :class:`mil.study.segstudy.SegStudyConfig` for ``task: segmentation``, else the slide study."""
    import yaml

    from mil.study.study import StudyConfig

    path = Path(path)
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("tasks"), str) and "task" not in data:
            data["task"] = data.pop("tasks")        # the spelling, `tasks: segmentation`
        form = data.get("task") if isinstance(data, dict) else None
        if form == "patch":
            return PatchStudyConfig.from_dict(data, path.parent.resolve(), source=str(path))
        if form == "segmentation":
            from mil.study.segstudy import SegStudyConfig

            return SegStudyConfig.from_dict(data, path.parent.resolve(), source=str(path))
        if form is not None:
            raise StudyError(f"{path}: task: {form!r}; choose patch or segmentation (leave it out for slides)")
    return StudyConfig.from_yaml(path)


__all__ = ["PatchStudy", "PatchStudyConfig", "PatchStudyResult", "load_study"]
