"""Names inside a store: feature keys, safe Zarr keys, chunk sizes, the format version.

Shared by the reader and the writer so both agree on where a slide's arrays live.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import NamedTuple

from featstore.errors import StoreError

#: 2: slides/zarr.json may hold the consolidated listing and writers leave .changes/ markers
#: (an older featstore would write without markers, so it must refuse the store).
FORMAT_VERSION = 2
CHUNK_BYTES = 1 << 20  # ~1 MiB feature chunks
SLIDES = "slides"
FAILURES = "failures"
#: Groups every writer creates up front, so concurrent writers never race to create them.
SHARED_GROUPS = (SLIDES, FAILURES)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class FeatureKey(NamedTuple):
    """One set of embeddings: encoder architecture, weights tag, truncation level."""

    encoder: str
    weights: str
    minus: int

    @property
    def path(self) -> str:
        """The array name under ``features/`` (safe for any Zarr store)."""
        return f"{safe_key(self.encoder)}__{safe_key(self.weights)}__minus{self.minus}"

    def __str__(self) -> str:
        return f"{self.encoder}:{self.weights}:minus{self.minus}"


def safe_key(text: str) -> str:
    """Map arbitrary text to a string usable as a Zarr key on every store backend."""
    out = _SAFE.sub("_", str(text)).strip("._")
    if not out:
        raise StoreError(f"{text!r} leaves nothing usable as a store key; rename it")
    return out


def safe_slide_id(name: str) -> str:
    """A slide id from a file name or CSV cell: no separators, no '..', only [A-Za-z0-9._-]."""
    return safe_key(str(name).replace("..", "_"))


def rows_per_chunk(dim: int, itemsize: int = 2) -> int:
    """Rows of a (N, dim) array that make a ~1 MiB chunk."""
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


def features_path(slide_id: str, key: FeatureKey) -> str:
    """The path of one slide's features array from the store root."""
    return f"{SLIDES}/{slide_id}/features/{key.path}"


def now() -> str:
    """UTC time stamp recorded in attributes (seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def preview(items: list[str], n: int = 5) -> str:
    """The first *n* items for an error message, with the total when there are more."""
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items)} in all)" if len(items) > n else "") if items else "none"
