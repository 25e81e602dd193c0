"""The segmentation form of a study (``task: segmentation``): image/mask pairs -> a U-Net /
U-Net++ per encoder x weights x architecture x training fraction x seed -> one report with the
seed papers' init table (Welch p against ImageNet, else random), in-domain beside
out-of-domain scores, and Dice against the training fraction.

    task: segmentation
    images: glands-he/images        # masks in the sibling masks/ (or masks: DIR);
                                    # or annotated slides: {slides: DIR, mpp: 1.0, patch: 256, ...}
    test_images: [glands-dark/images]   # out-of-domain sets (folders or slide mappings), no retraining
    encoders:
      - {name: resnet18, weights: [random, imagenet-or-random, pretrain-out/f1/pretrain-simclr-resnet18-f1.pt]}
    archs: [unet, unetplusplus]
    seeds: [0, 1, 2]
    train_fractions: [0.25, 1.0]
    seg: {epochs: 20, crop: 128, mask_kind: instance}   # SegConfig fields (docs/segmentation.md)

Every dataset is loaded once; each run writes ``<out>/seg/runs/<run>/`` (the `mil seg train`
folder) and a rerun skips every run whose folder holds metrics for the same configuration.
An encoder's ``levels`` are not used: a U-Net takes the whole encoder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from featstore.core.config import from_dict
from featstore.core.errors import CoreError
from mil.study.base import (EncoderPlan, Progress, StudyBase, StudyEvent, StudyForm, StudyResult, at, check_plans,
                            expand_shorthand, resolve, section, weights_request, with_fields)
from mil.study.errors import StudyError
from mil.study.report import SegReport, write_seg_report

if TYPE_CHECKING:  # pragma: no cover
    from mil.seg.config import SegConfig

#: SegConfig fields the study sets itself (from encoders, archs, train_fractions, seeds).
STUDY_SETS = ("encoder", "weights", "arch", "fraction", "seed")


def _looks_like_file(w: str) -> bool:
    return "/" in w or "\\" in w or w.endswith((".pt", ".pth", ".safetensors", ".bin"))


@dataclass
class SegStudyConfig(StudyForm):
    """The ``task: segmentation`` YAML, validated (paths relative to the YAML's folder); ``seg``
    keeps the YAML's keys, :attr:`sections` the SegConfig built from them once."""

    images: str | dict
    encoders: list[EncoderPlan]
    task: str = "segmentation"
    masks: str | None = None
    test_images: list[str | dict] = field(default_factory=list)
    out: str = "study"
    name: str = "segmentation study"
    archs: list[str] = field(default_factory=lambda: ["unet"])
    seeds: list[int] = field(default_factory=lambda: [0])
    train_fractions: list[float] = field(default_factory=lambda: [1.0])
    baseline: str | None = None
    seg: dict = field(default_factory=dict)

    required = ("images", "encoders")

    @classmethod
    def prepare(cls, d: dict) -> dict:
        d = expand_shorthand(d)          # an encoder by name, weights: tag
        for key in ("test_images", "archs"):
            if isinstance(d.get(key), str):
                d[key] = [d[key]]
        return d

    @classmethod
    def keywords(cls, kw: dict, root: Path) -> dict:
        kw["encoders"] = [_plan(e, i) for i, e in enumerate(kw["encoders"])]
        kw["images"] = _source(root, kw["images"], "images")
        kw["out"] = resolve(root, kw.get("out", "study"))
        if kw.get("masks"):
            kw["masks"] = resolve(root, kw["masks"])
        kw["test_images"] = [_source(root, t, f"test_images[{i}]") for i, t in enumerate(kw.get("test_images", []))]
        for plan in kw["encoders"]:
            plan.weights[:] = [resolve(root, w) if _looks_like_file(w) else w for w in plan.weights]
        return kw

    def validate(self) -> None:
        """Check the plans and architectures and build the ``seg`` section once (:attr:`sections`)."""
        from mil.seg.config import SegConfig
        from mil.seg.model import ARCHITECTURES

        if self.task != "segmentation":
            raise StudyError(f"task: {self.task!r}; this form is task: segmentation")
        check_plans(self.encoders, self.seeds)
        for a in self.archs:
            if a not in ARCHITECTURES:
                raise StudyError(f"archs: {a!r} is not one of {', '.join(ARCHITECTURES)}")
        if not self.archs or not self.train_fractions:
            raise StudyError("archs and train_fractions need at least one entry each")
        self._sections = section(SegConfig, self.seg, "seg", exclude=STUDY_SETS, encoder=self.encoders[0].name,
                            weights="random", arch=self.archs[0], fraction=1.0, seed=self.seeds[0])
        for f in self.train_fractions:
            at("train_fractions", self.seg_config, self.encoders[0].name, "random", self.archs[0], f, self.seeds[0])
        for plan in self.encoders:
            for w in plan.weights:
                if _looks_like_file(w) and not Path(w).is_file():
                    raise StudyError(f"encoders: weights file {w} does not exist")

    def seg_config(self, encoder: str, weights: str, arch: str, fraction: float, seed: int) -> SegConfig:
        return with_fields(self.sections, "seg", encoder=encoder, weights=weights, arch=arch,
                           fraction=float(fraction), seed=int(seed))

    def runner(self, progress: Progress | None = None) -> "SegStudy":
        return SegStudy(self, progress)


def _source(root: Path, spec: str | dict, where: str) -> str | dict:
    """A dataset entry with its paths resolved: a folder, or a :class:`mil.seg.run.WsiSource` mapping
    (checked here, so a bad key fails before any training)."""
    if isinstance(spec, str):
        return resolve(root, spec)
    from mil.seg.run import WsiSource

    spec = {**spec, **{k: resolve(root, spec[k]) for k in ("slides", "annotations") if spec.get(k)}}
    src = from_dict(WsiSource, spec, where=where, error=StudyError)
    if not src.slides:
        raise StudyError(f"{where}: a slide dataset needs slides: DIR")
    return spec


def _plan(e, i: int) -> EncoderPlan:
    if isinstance(e, EncoderPlan):
        return e
    e = {"name": e} if isinstance(e, str) else dict(e)
    if isinstance(e.get("weights"), str):
        e["weights"] = [e["weights"]]
    return from_dict(EncoderPlan, e, where=f"encoders[{i}]", error=StudyError)


def run_name(encoder: str, weights: str, arch: str, fraction: float, seed: int) -> str:
    """The run folder's name: a weights file is named by its stem."""
    w = Path(weights).stem if _looks_like_file(weights) else weights
    return f"{encoder}-{w}-{arch}-f{fraction:g}-s{seed}"


SegStudyResult = StudyResult   # one result type for every form


class SegStudy(StudyBase):
    """Runs a :class:`SegStudyConfig` (module docstring)."""

    new_work_keys = ("seg_runs", "reused_runs")

    def __init__(self, cfg: SegStudyConfig, progress: Progress | None = None):
        super().__init__(cfg, progress)
        self.run_dirs: list[Path] = []

    def jobs(self) -> list:
        """Every run's SegConfig, in plan order (weights resolved: ``imagenet-or-random``)."""
        c = self.cfg
        return [c.seg_config(e.name, weights_request(e.name, w), a, f, s)
                for e in c.encoders for w in e.weights for a in c.archs for f in c.train_fractions for s in c.seeds]

    def _done(self, run: Path, cfg) -> bool:
        try:
            old = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            return False
        same = all(old.get(k) == v for k, v in json.loads(json.dumps(asdict(cfg), default=str)).items())
        return same and (run / "metrics.json").is_file() and (run / "model.pt").is_file()

    def datasets(self, cfg):
        """The training set and the out-of-domain sets, each loaded once (a bad out-of-domain set
        is a listed failure; a bad training set stops the study)."""
        from mil.seg.run import WsiSource, load_folder, load_wsi

        def load(spec, masks=None):
            if isinstance(spec, str):
                return load_folder(spec, masks, cfg)
            return load_wsi(from_dict(WsiSource, spec, error=StudyError), cfg)

        train = load(self.cfg.images, self.cfg.masks)
        ood = []
        for spec in self.cfg.test_images:
            try:
                ood.append(load(spec))
            except CoreError as exc:
                self.fail("load", spec if isinstance(spec, str) else spec["slides"], exc)
        names = [d.name for d in ood]
        if len(set(names)) < len(names):
            raise StudyError(f"test_images: two out-of-domain sets are both called {names}; rename a folder")
        return train, ood

    def run(self) -> StudyResult:
        from mil.seg.run import run_segmentation

        t0 = time.perf_counter()
        jobs = self.jobs()
        train, ood = self.datasets(jobs[0])
        for i, cfg in enumerate(jobs):
            name = run_name(cfg.encoder, cfg.weights, cfg.arch, cfg.fraction, cfg.seed)
            run = self.out / "seg" / "runs" / name
            self.progress(StudyEvent("segment", i, len(jobs), name))
            if self._done(run, cfg):
                self.new_work["reused_runs"] += 1
                self.run_dirs.append(run)
                continue
            try:
                run_segmentation(cfg, train, run, ood)
            except Exception as exc:  # noqa: BLE001 -- one configuration failing must not stop the study
                self.fail("segment", name, exc)
                continue
            self.new_work["seg_runs"] += 1
            self.run_dirs.append(run)
        self.progress(StudyEvent("segment", len(jobs), len(jobs)))
        self.train_set, self.ood_sets = train, ood
        c = self.cfg
        report = write_seg_report(SegReport(
            name=c.name, out=self.out, new_work=self.new_work, failures=self.failures,
            seconds=time.perf_counter() - t0, encoders=[f"{e.name}:{w}" for e in c.encoders for w in e.weights],
            archs=c.archs, train_fractions=c.train_fractions, seeds=c.seeds, seg=c.seg, baseline=c.baseline,
            train_set=train, ood_sets=ood, run_dirs=self.run_dirs))
        return self.result(report)


__all__ = ["SegStudy", "SegStudyConfig", "SegStudyResult", "run_name"]
