"""Errors raised by analysis: one base type, messages a user can act on."""

from __future__ import annotations


class AnalysisError(Exception):
    """Base class of every analysis error."""
