"""Opening a store: a local directory or any fsspec URL, for reading or for writing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, overload

import zarr

from featstore.errors import StoreError
from featstore.read.remote import is_remote, remote_options
from featstore.store._layout import FORMAT_VERSION, SHARED_GROUPS, now
from featstore.store.reader import StoreReader
from featstore.store.writer import StoreWriter


def _open_root(spath: str, mode: str, storage_options: dict | None) -> zarr.Group:
    """The store's root group; a writer creates the store and its shared groups up front."""
    from featstore import __version__

    if mode == "r" and not is_remote(spath) and not Path(spath.removeprefix("file://")).exists():
        raise StoreError(f"{spath}: no such store (run `featstore extract ... --store {spath}` first)")
    kwargs = {}
    if is_remote(spath):  # listing caches would hide slides other processes wrote
        kwargs = {"storage_options": remote_options(spath, storage_options)}
    try:
        root = zarr.open_group(store=spath, mode=mode, zarr_format=3, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"{spath}: not a featstore store ({exc})") from None
    except (ValueError, zarr.errors.NodeTypeValidationError) as exc:
        raise StoreError(f"{spath}: cannot open as a Zarr v3 group ({exc})") from None
    meta = root.attrs.get("featstore")
    if meta is None:
        if mode == "r":
            raise StoreError(f"{spath}: a Zarr group but not a featstore store (no 'featstore' attribute)")
        root.attrs["featstore"] = {"format": FORMAT_VERSION, "version": __version__, "created": now(), "tiling": None}
    elif int(meta.get("format", 0)) > FORMAT_VERSION:
        raise StoreError(f"{spath}: store format {meta.get('format')} is newer than this featstore; upgrade it")
    if mode == "a":  # created up front so concurrent writers never race to create them (S3)
        _require_shared_groups(root)
        from featstore.store.catalog import ShieldedStore

        # writers create nodes through a view that hides the listing from zarr's ancestor checks
        root = zarr.open_group(store=ShieldedStore(root.store), mode="r+", zarr_format=3)
    return root


def _require_shared_groups(root: zarr.Group) -> None:
    """Create ``slides`` and ``failures`` if missing, without opening them: ``slides/zarr.json``
    may hold the consolidated listing of every slide, which a writer has no need to parse."""
    from featstore.store.catalog import _sync

    for name in SHARED_GROUPS:
        if _sync(root.store.exists(f"{name}/zarr.json")):
            continue
        try:
            root.create_group(name)
        except zarr.errors.ContainsGroupError:  # another writer made it first
            pass


def open_store_writer(path: str | os.PathLike, storage_options: dict | None = None) -> StoreWriter:
    """Open (creating if missing) a store for writing: the extractor's and importers' entry point."""
    spath = str(path)
    return StoreWriter(_open_root(spath, "a", storage_options), spath)


@overload
def open_store(path: str | os.PathLike, mode: Literal["r"] = "r",
               storage_options: dict | None = None) -> StoreReader: ...
@overload
def open_store(path: str | os.PathLike, mode: Literal["a"],
               storage_options: dict | None = None) -> StoreWriter: ...
def open_store(path: str | os.PathLike, mode: str = "r", storage_options: dict | None = None) -> StoreReader:
    """Open a feature store.

    mode "r" (the default): the read API, the store must exist; "a": a :class:`StoreWriter`,
    created if missing. ``path`` may be a local directory or any fsspec URL
    (``s3://bucket/cohort.zarr``) with ``storage_options`` passed to fsspec.
    """
    if mode == "a":
        return open_store_writer(path, storage_options)
    if mode != "r":
        raise StoreError(f"mode must be 'r' or 'a', not {mode!r}")
    spath = str(path)
    return StoreReader(_open_root(spath, "r", storage_options), spath)
