"""Store locations for scale-out: local paths made absolute, fsspec URLs with their options.

Every process of a distributed run (client, each worker) opens the store itself, so the
location must mean the same thing everywhere: a local path is made absolute; a URL such as
``s3://bucket/cohort.zarr`` is kept and travels with its ``storage_options`` (endpoint,
credentials). Without options fsspec's own configuration applies: the standard ``AWS_*``
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``) and
``FSSPEC_S3_<KWARG>`` / ``FSSPEC_S3='{json}'``.
"""

from __future__ import annotations

import json
from pathlib import Path

from featstore.errors import StoreError

#: Listing caches of object-store filesystems go stale when other processes write the store.
FRESH_LISTINGS = {"use_listings_cache": False}


def is_remote(path: str | Path) -> bool:
    """True for fsspec URLs other than ``file://`` (the store has no local directory)."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def store_location(path: str | Path) -> str:
    """The store path every process can open: absolute for local stores, unchanged for URLs."""
    s = str(path)
    if is_remote(s):
        return s
    return str(Path(s.removeprefix("file://")).expanduser().resolve())


def remote_options(path: str | Path, storage_options: dict | None = None) -> dict | None:
    """Options for opening *path* in a process that reads what other processes wrote.

    Remote stores get listing caches turned off (a cached ``slides/`` listing would hide slides
    written by workers); user options win. Local stores need none (returns None).
    """
    if not is_remote(path):
        return None
    return {**FRESH_LISTINGS, **(storage_options or {})}


def parse_storage_options(text: str | None) -> dict | None:
    """``--storage-options '{"endpoint_url": "http://minio:9000"}'`` -> dict (None when empty)."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"--storage-options is not valid JSON ({exc.msg}); give an object, e.g. "
                         '\'{"endpoint_url": "http://host:9000"}\'') from None
    if not isinstance(value, dict):
        raise StoreError("--storage-options must be a JSON object, e.g. '{\"endpoint_url\": \"http://host:9000\"}'")
    return value
