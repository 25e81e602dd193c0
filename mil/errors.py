"""Errors raised by mil: one base type, messages a user can act on."""

from __future__ import annotations

from featstore.core.errors import ConfigError, CoreError
from featstore.core.errors import LabelsError as CoreLabelsError


class MilError(CoreError):
    """Base class of every mil error (bad run directory, bad config, a task that cannot run)."""


class LabelsError(MilError, CoreLabelsError):
    """A labels CSV is malformed or does not match the store, met by mil (the shared reader
    :mod:`featstore.core.labels` raises this class when mil passes ``error=LabelsError``)."""


class MilConfigError(MilError, ConfigError):
    """A mil config value is outside what the field declares (also a ConfigError, a ValueError)."""


class RunError(MilError, FileNotFoundError):
    """A run directory is missing or incomplete."""


__all__ = ["LabelsError", "MilConfigError", "MilError", "RunError"]
