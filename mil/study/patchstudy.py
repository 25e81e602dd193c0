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
from typing import TYPE_CHECKING

from featstore.core.config import from_dict
from mil.study.base import (EncoderPlan, Progress, StudyBase, StudyEvent, StudyForm, StudyResult, at, check_plans, resolve,
                            resolve_extract_paths, section, weights_request, with_fields)
from mil.study.errors import StudyError
from mil.study.report import PatchReport, write_patch_report

if TYPE_CHECKING:  # pragma: no cover
    from featstore.config import ExtractConfig
    from mil.patches.config import PatchConfig
    from mil.patches.finetune import FinetuneSettings

#: PatchConfig fields the study sets itself (from encoders, train_fractions, seeds, methods).
STUDY_SETS = ("encoder", "levels", "weights", "method", "fractions", "seeds")


@dataclass(frozen=True)
class PatchSections:
    """The patch study's sections as configs, built once: a run replaces the encoder, levels,
    weights and method of ``patches`` and the encoder, weights and levels of ``extract``."""

    extract: ExtractConfig
    patches: PatchConfig
    finetune: FinetuneSettings | None
    finetune_levels: list[int] | None


@dataclass
class PatchStudyConfig(StudyForm):
    """The ``task: patch`` YAML, validated (paths relative to the YAML's folder); the dict
    sections keep the YAML's keys, :attr:`sections` the configs built from them."""

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

    required = ("images", "encoders")

    @classmethod
    def keywords(cls, kw: dict, root: Path) -> dict:
        kw["encoders"] = [e if isinstance(e, EncoderPlan) else from_dict(EncoderPlan, e, where=f"encoders[{i}]",
                                                                             error=StudyError)
                          for i, e in enumerate(kw["encoders"])]
        for k, default in (("images", None), ("store", "patches.zarr"), ("out", "study")):
            kw[k] = resolve(root, kw.get(k, default))
        kw["extract"] = resolve_extract_paths(root, kw.get("extract", {}))
        return kw

    def validate(self) -> None:
        """Build :attr:`sections` once, so a bad key or value fails before any work."""
        from featstore.config import ExtractConfig
        from mil.patches.config import PatchConfig
        from mil.patches.finetune import FinetuneSettings

        if self.task != "patch":
            raise StudyError(f"task: {self.task!r}; this form is task: patch")
        check_plans(self.encoders, self.seeds)
        first = self.encoders[0]
        ft = dict(self.finetune)
        enabled, levels = ft.pop("enabled", False), ft.pop("levels", None)
        if not isinstance(enabled, bool):
            raise StudyError(f"finetune.enabled: expected bool, got {enabled!r}")
        settings = from_dict(FinetuneSettings, ft, where="finetune", error=StudyError)
        patches = section(PatchConfig, self.patches, "patches", exclude=STUDY_SETS, encoder=first.name,
                          fractions=tuple(self.train_fractions), seeds=tuple(self.seeds))
        self._sections = PatchSections(
            extract=section(ExtractConfig, self.extract, "extract", encoder=first.name, weights="random",
                            levels=tuple(first.levels)),
            patches=patches, finetune=settings if enabled else None, finetune_levels=levels)
        for m in self.methods:
            at("methods", self.patch_config, first.name, [0], None, m)

    def patch_config(self, encoder: str, levels, weights: str | None, method: str) -> PatchConfig:
        return with_fields(self.sections.patches, "patches", encoder=encoder, levels=tuple(levels),
                           weights=weights, method=method)

    def finetune_settings(self) -> tuple[FinetuneSettings, list[int] | None] | None:
        """(FinetuneSettings, levels or None) when ``finetune.enabled``, else None."""
        s = self.sections
        return None if s.finetune is None else (s.finetune, s.finetune_levels)

    def extract_config(self, encoder: str, weights: str, levels) -> ExtractConfig:
        return with_fields(self.sections.extract, "extract", encoder=encoder, weights=weights, levels=tuple(levels))

    def runner(self, progress: Progress | None = None) -> "PatchStudy":
        return PatchStudy(self, progress)


PatchStudyResult = StudyResult   # one result type for every form


class PatchStudy(StudyBase):
    """Runs a :class:`PatchStudyConfig`'s stages (module docstring)."""

    new_work_keys = ("extracted_images", "patch_runs")

    def __init__(self, cfg: PatchStudyConfig, progress: Progress | None = None):
        super().__init__(cfg, progress)
        self.records: list[dict] = []

    def plans(self) -> list[tuple[str, str, list[int]]]:
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
                self.fail("extract", f"{enc}:{w}", exc)
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
                self.fail(stage, f"{cfg.encoder}:{cfg.weights}:{cfg.method}", exc)
                continue
            self.records += res.records
        self.progress(StudyEvent(stage, len(jobs), len(jobs)))

    def run(self) -> StudyResult:
        from mil.patches.outputs import write_study

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
        cfg = self.cfg
        report = write_patch_report(PatchReport(
            name=cfg.name, out=self.out, new_work=self.new_work, failures=self.failures,
            seconds=time.perf_counter() - t0, images=cfg.images, store=cfg.store, plans=self.plans(),
            methods=cfg.methods, finetune=ft is not None, seeds=cfg.seeds, train_fractions=cfg.train_fractions,
            extract=cfg.extract, records=self.records, files=files))
        return self.result(report)


__all__ = ["PatchSections", "PatchStudy", "PatchStudyConfig", "PatchStudyResult"]
