"""featstore: whole-slide images -> tissue tiles -> encoder embeddings in chunked Zarr stores."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from featstore.errors import FeatstoreError

try:
    __version__ = version("featstore")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"


def open_store(path, mode: str = "r", storage_options: dict | None = None):
    """Open a feature store (the public read API); see :mod:`featstore.store`."""
    from featstore.store import open_store as _open

    return _open(path, mode=mode, storage_options=storage_options)


__all__ = ["FeatstoreError", "open_store", "__version__"]
