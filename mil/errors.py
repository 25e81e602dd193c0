"""Errors raised by mil: one base type, messages a user can act on."""

from __future__ import annotations

from featstore.core.errors import CoreError, LabelsError


class MilError(CoreError):
    """Base class of every mil error (bad run directory, bad config, a task that cannot run)."""


class RunError(MilError, FileNotFoundError):
    """A run directory is missing or incomplete."""


__all__ = ["MilError", "RunError", "LabelsError"]   # LabelsError: featstore.core.errors (labels live there)
