"""Errors raised by seg: one base type, messages a user can act on."""

from __future__ import annotations

from featstore.core.errors import CoreError


class SegError(CoreError, ValueError):
    """Base class of every seg error: bad folders, image/mask pairs, mask values or metric input."""


__all__ = ["SegError"]
