"""Errors raised by analysis: one base type, messages a user can act on."""

from __future__ import annotations

from featstore.core.errors import CoreError


class AnalysisError(CoreError):
    """Base class of every analysis error."""


class RecordsError(AnalysisError, ValueError):
    """Run records cannot be tabled (missing keys, duplicate seeds, no metric, unknown baseline)."""
