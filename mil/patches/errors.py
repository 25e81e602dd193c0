"""Errors raised by patches: one base type, messages a user can act on."""

from __future__ import annotations

from featstore.core.errors import CoreError


class PatchError(CoreError, ValueError):
    """Base class of every patches error: bad labels, splits, fractions, records or arrays."""


__all__ = ["PatchError"]
