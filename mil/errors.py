"""Errors raised by mil: one base type, messages a user can act on."""

from __future__ import annotations

from core.errors import CoreError


class MilError(CoreError):
    """Base class of every mil error (bad labels, bad run directory, bad config)."""


class LabelsError(MilError, ValueError):
    """The labels CSV is malformed or does not match the store."""


class RunError(MilError, FileNotFoundError):
    """A run directory is missing or incomplete."""
