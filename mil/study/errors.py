"""Errors raised by study: one base type, messages a user can act on."""

from __future__ import annotations

from featstore.core.errors import CoreError


class StudyError(CoreError, ValueError):
    """The study file is invalid, or a study stage cannot start."""
