"""What the three study forms share: the runner protocol, progress events, the result, the
encoder plans and the small helpers that validate a YAML file against the toolkit's configs.

A study form is a config class (:class:`mil.study.study.StudyConfig` for slides,
``PatchStudyConfig`` for ``task: patch``, ``SegStudyConfig`` for ``task: segmentation``) whose
``runner(progress)`` builds a :class:`StudyRunner`; `featstore study` runs whichever form the file
names (:mod:`mil.study.forms`) through that one protocol.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar, runtime_checkable

from featstore.core.config import Config, coerce_fields, from_dict, option
from featstore.core.errors import CoreError, first_line
from mil.study.errors import StudyError

log = logging.getLogger(__name__)
C = TypeVar("C")


@dataclass
class StudyEvent:
    """Progress of the study: stage name, item k of n, a short text."""

    stage: str
    done: int
    total: int
    text: str = ""


@dataclass
class StudyResult:
    """What every study form returns: its folder, report, failed items and the work this run did."""

    out: Path
    report: Path
    failures: list[dict]
    new_work: dict[str, int]


Progress = Callable[[StudyEvent], None]


@runtime_checkable
class StudyRunner(Protocol):
    """A study form's runner: stages that skip what is on disk, failures listed, one report."""

    out: Path
    failures: list[dict]
    new_work: dict[str, int]

    def run(self) -> StudyResult: ...


class StudyBase:
    """The state every runner keeps: its config, folder, progress callback, failures and work."""

    new_work_keys: tuple[str, ...] = ()

    def __init__(self, cfg, progress: Progress | None = None):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.progress: Progress = progress or (lambda e: None)
        self.failures: list[dict] = []
        self.new_work: dict[str, int] = {k: 0 for k in self.new_work_keys}

    def fail(self, stage: str, item: str, exc: BaseException) -> None:
        """Record one failed item (its error's first line) and go on."""
        msg = first_line(exc)
        log.error("%s %s failed: %s", stage, item, msg)
        log.debug("".join(traceback.format_exception(exc)))
        self.failures.append({"stage": stage, "item": item, "error": msg})

    def result(self, report: Path) -> StudyResult:
        return StudyResult(self.out, report, self.failures, dict(self.new_work))


class StudyForm:
    """The config side of a study form: :meth:`from_dict` checks the file's keys against the
    dataclass (``required`` ones present), lets the form resolve its paths (:meth:`keywords`),
    builds it and runs its ``validate()``, which builds the typed sections (:attr:`sections`);
    any problem is one StudyError line ``<file>: <key path>: ...`` before any work."""

    required: tuple[str, ...] = ()

    @classmethod
    def keywords(cls, kw: dict, root: Path) -> dict:
        """The checked keys with paths resolved against *root* (the study file's folder)."""
        return kw

    @classmethod
    def prepare(cls, d: dict) -> dict:
        """The raw mapping before its keys are checked (shorthands expanded)."""
        return d

    @classmethod
    def from_dict(cls, d: dict, root: Path, *, source: str = "study"):
        try:
            kw = coerce_fields(cls, cls.prepare(d), error=StudyError)
            missing = [k for k in cls.required if k not in kw]
            if missing:
                raise StudyError(f"missing keys {missing}")
            cfg = cls(**cls.keywords(kw, root))
            cfg.validate()
        except CoreError as exc:
            raise StudyError(f"{source}: {exc}") from None
        return cfg

    def validate(self) -> None:
        raise NotImplementedError

    @property
    def sections(self):
        """The typed sections :meth:`validate` built (``from_dict`` validates)."""
        if getattr(self, "_sections", None) is None:
            self.validate()
        return self._sections


@dataclass
class EncoderPlan(Config):
    """One encoder architecture with the weights and truncation levels to study."""

    config_error = StudyError

    name: str = option(help="Encoder name (see `featstore encoders`).")
    weights: list[str] = option(default_factory=lambda: ["random"], help="Weights tags (or one tag).")
    levels: list[int] = option(default_factory=lambda: [0, 1, 2, 3], help="Truncation levels (minus K).")


def section(cls: type[C], data: dict, where: str, *, exclude: tuple[str, ...] = (), **study_sets: Any) -> C:
    """The YAML section *data* as a *cls* config, checked once: the fields the study sets itself
    (*exclude*) are refused in the file and filled from *study_sets*; errors name ``where.key``.
    Runs then take ``dataclasses.replace(section, field=value)`` instead of re-parsing the dict."""
    kw = coerce_fields(cls, data, where=where, exclude=exclude, error=StudyError)
    cfg = from_dict(cls, {**kw, **study_sets}, where=where, error=StudyError)
    if "device" in {f.name for f in fields(cls)}:
        at(f"{where}.device", check_device, cfg.device)
    return cfg


def with_fields(cfg: C, where: str = "", **values: Any) -> C:
    """*cfg* with *values* set; the config's own validation runs again, and a value it refuses is
    one :class:`StudyError` line prefixed with *where*, as :func:`section` words it."""
    try:
        return replace(cfg, **values)
    except CoreError as exc:
        raise StudyError(f"{where}: {exc}" if where else str(exc)) from None


def check_plans(encoders: list[EncoderPlan], seeds: list[int]) -> None:
    """Every plan names a known encoder and levels it has; at least one plan and one seed."""
    from featstore.encoders import get_spec

    if not encoders or not seeds:
        raise StudyError("encoders and seeds need at least one entry each")
    for i, plan in enumerate(encoders):
        spec = at(f"encoders[{i}].name", get_spec, plan.name)
        for lv in plan.levels:
            at(f"encoders[{i}].levels", spec.check_level, lv)


def weights_request(enc: str, w: str) -> str:
    """A plan's weights as the extractor takes them: ``imagenet-or-random`` becomes ``imagenet``
    where the file is on this machine, else ``random``; anything else is returned as is."""
    if w == "imagenet-or-random":
        from featstore.encoders import find_weights, get_spec

        ws = get_spec(enc).weights.get("imagenet")
        return "imagenet" if ws is not None and find_weights(ws) is not None else "random"
    return w


def expand_shorthand(d: dict) -> dict:
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


def resolve_extract_paths(root: Path, extract: dict) -> dict:
    """The ``extract:`` section with its file paths (``stain_reference``) relative to the study file."""
    if isinstance(extract, dict) and extract.get("stain_reference"):
        return {**extract, "stain_reference": resolve(root, str(extract["stain_reference"]))}
    return extract


def check_device(name: str) -> None:
    from featstore.core.runtime import resolve_device

    resolve_device(name)


def at(path: str, check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)``; its one-line error is re-raised as a StudyError prefixed with the key path."""
    try:
        return check(*args)
    except CoreError as exc:
        raise StudyError(f"{path}: {exc}") from None


def resolve(root: Path, p: str) -> str:
    """*p* relative to the study file's folder *root* (URLs and absolute paths as they are)."""
    if "://" in str(p):
        return str(p)
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (root / q))


__all__ = ["EncoderPlan", "StudyBase", "StudyEvent", "StudyForm", "StudyResult", "StudyRunner", "at", "check_device",
           "check_plans", "expand_shorthand", "resolve", "resolve_extract_paths", "section", "weights_request",
           "with_fields"]
