"""Errors raised by patches: one base type, messages a user can act on."""

from __future__ import annotations

from featstore.core.errors import ConfigError, CoreError


class PatchError(CoreError, ValueError):
    """Base class of every patches error: bad labels, splits, fractions, records or arrays."""


class PatchConfigError(PatchError, ConfigError):
    """A patches config value is outside what the field declares."""


__all__ = ["PatchConfigError", "PatchError"]
