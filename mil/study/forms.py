"""The study forms a YAML file can take, by its ``task`` key, and the loader that picks one.

======================  ==========================================  ============================
``task``                config (validated when the file is read)    runner (``cfg.runner()``)
======================  ==========================================  ============================
(absent) / ``slide``    :class:`mil.study.study.StudyConfig`        :class:`~mil.study.study.Study`
``survival`` etc.       the same, for that endpoint (:data:`ENDPOINTS`)  ``Study``
``patch``               :class:`~mil.study.patchstudy.PatchStudyConfig`  ``PatchStudy``
``segmentation``        :class:`~mil.study.segstudy.SegStudyConfig`      ``SegStudy``
======================  ==========================================  ============================

Every runner follows :class:`mil.study.base.StudyRunner` and returns a
:class:`~mil.study.base.StudyResult`, so `featstore study` runs any form the same way.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mil.study.errors import StudyError
from mil.study.patchstudy import PatchStudyConfig
from mil.study.segstudy import SegStudyConfig
from mil.study.study import StudyConfig

#: task -> config class; the slide study is the form without a ``task`` key
FORMS: dict[str, type] = {"slide": StudyConfig, "patch": PatchStudyConfig, "segmentation": SegStudyConfig}
#: ``task`` values that make a slide study of that endpoint (mil train --task)
ENDPOINTS = ("classification", "survival", "regression")


def load_study(path: str | Path):
    """The study config of a YAML file, in the form its ``task`` names (slides when absent)."""
    path = Path(path)
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("tasks"), str) and "task" not in data:
            data["task"] = data.pop("tasks")        # the spelling, `tasks: segmentation`
        form = data.get("task") if isinstance(data, dict) else None
        if form in ("patch", "segmentation"):
            return FORMS[form].from_dict(data, path.parent.resolve(), source=str(path))
        if form in ENDPOINTS:   # a slide study of that endpoint
            data = {**{k: v for k, v in data.items() if k != "task"}, "endpoint": form}
            return StudyConfig.from_dict(data, path.parent.resolve(), source=str(path))
        if form is not None:
            raise StudyError(f"{path}: task: {form!r}; choose patch or segmentation, or {', '.join(ENDPOINTS)} "
                             "for a slide study (leave it out to read the endpoint from the labels' columns)")
    return StudyConfig.from_yaml(path)


__all__ = ["FORMS", "load_study"]
