"""Errors raised by featstore.

Every error carries a one-line message that names the file (or object) and says what to do.
Each inherits from :class:`FeatstoreError` and from the matching builtin, so callers can catch
either (``except FileNotFoundError`` still works), as zarr-python does.
"""

from __future__ import annotations

from featstore.core.errors import ConfigError, CoreError


class FeatstoreError(CoreError):
    """Base class of every featstore error."""


class SlideNotFoundError(FeatstoreError, FileNotFoundError):
    """The slide file does not exist."""


class SlideFormatError(FeatstoreError, ValueError):
    """OpenSlide cannot open the file (unsupported, corrupt, truncated)."""


class SlideReadError(FeatstoreError, OSError):
    """A region of an opened slide could not be decoded (corrupt tile)."""


class MissingMppError(FeatstoreError, ValueError):
    """The slide records no microns-per-pixel and none was given with --mpp."""


class SlideChangedError(FeatstoreError, ValueError):
    """A slide file is not the one tiled into the store (its size or hash changed)."""


class EncoderError(FeatstoreError, ValueError):
    """Unknown encoder, level or weights tag."""


class WeightsError(FeatstoreError, ValueError):
    """A weights file is unusable (unsafe pickle, wrong keys, wrong shapes)."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A weights file is not on this machine."""


class StoreError(FeatstoreError, ValueError):
    """A feature store is missing, malformed, or lacks the requested data."""


class StoreKeyError(StoreError, KeyError):
    """The store has no such slide / encoder / level."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class StainError(FeatstoreError, ValueError):
    """A stain normaliser cannot be fitted or rebuilt as asked (no tissue, unknown method, bad record)."""


class PretrainError(FeatstoreError, ValueError):
    """Self-supervised pretraining cannot run as asked (method vs encoder, empty store, ...)."""


class FeatstoreConfigError(FeatstoreError, ConfigError):
    """A featstore config value is outside what the field declares (also a ConfigError, a ValueError)."""


class TilingError(FeatstoreConfigError):
    """An invalid tiling configuration."""


class PretrainConfigError(PretrainError, FeatstoreConfigError):
    """A pretraining config value is outside what the field declares."""


class ClusterError(FeatstoreError, RuntimeError):
    """The cluster cannot be reached, or a task failed for a reason that is not the slide's."""


class StoreReadOnlyError(StoreError, AttributeError):
    """A writer method was called on a store opened for reading (``hasattr`` says False)."""
