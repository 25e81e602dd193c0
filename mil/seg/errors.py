"""Errors raised by seg: one base type, messages a user can act on."""

from __future__ import annotations

from featstore.core.errors import ConfigError, CoreError


class SegError(CoreError, ValueError):
    """Base class of every seg error: bad folders, image/mask pairs, mask values or metric input."""


class SegConfigError(SegError, ConfigError):
    """A seg config value is outside what the field declares."""


__all__ = ["SegConfigError", "SegError"]
