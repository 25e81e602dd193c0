"""The toolkit's root error type.

Every package's own base error (``FeatstoreError``, ``MilError``, ``AnalysisError``,
``StudyError``) derives from :class:`CoreError`, so a command can turn any user error into one
red line by catching this one type. Errors raised by ``core`` itself (a bad device name, a bad
config key, a statistic asked of impossible input) are :class:`CoreError` subclasses that also
inherit the matching builtin, as zarr-python does.
"""

from __future__ import annotations


class CoreError(Exception):
    """Base class of every error the toolkit raises on bad input."""


class ConfigError(CoreError, ValueError):
    """A config value or key is invalid (unknown key, wrong type, out of range, bad device)."""


class StatsError(CoreError, ValueError):
    """A statistic was asked of input it cannot be computed on (shapes, a single class)."""
