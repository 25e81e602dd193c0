"""Errors raised by analysis: one base type, messages a user can act on."""

from __future__ import annotations

from core.errors import CoreError


class AnalysisError(CoreError):
    """Base class of every analysis error."""
