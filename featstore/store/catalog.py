"""The store-wide listing: Zarr's consolidated metadata of ``slides/``, corrected by change markers.

Listing a store by walking its groups costs one metadata read per node (a 30k-slide store holds
hundreds of thousands), so ``featstore extract`` ends by consolidating the ``slides`` group with
:func:`zarr.consolidate_metadata`: one ``slides/zarr.json`` then holds every slide's and array's
metadata, and a reader lists the store from that one object.

A consolidated view is a snapshot. So that a stale one never shows a half-written slide nor
hides a finished one, every writer leaves a marker under ``.changes/`` around each change of a
slide: ``<slide>~<token>.open`` before it touches the slide, ``<slide>~<token>.done`` once the
change is complete (the ``.open`` one is then removed). A reader lists the markers *first*, then
reads the snapshot, and reads the marked slides from their own metadata. A consolidation lists
the markers before it takes its snapshot and afterwards removes only the ``.done`` markers it
listed (and ``.open`` ones left by a writer that died more than a day ago), so every change the
snapshot may have missed keeps its marker.
"""

from __future__ import annotations

import gc
import json
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import zarr
from zarr.storage import WrapperStore

from featstore.store._layout import SLIDES, FeatureKey

CHANGES = ".changes"
BLOB = f"{SLIDES}/zarr.json"
#: An ``.open`` marker older than this belongs to a writer that died mid-change; consolidation drops it.
OPEN_STALE_SECONDS = 24 * 3600.0


#: What a writer reads as ``slides/zarr.json``: the plain group document, without the listing.
PLAIN_GROUP = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'


class ShieldedStore(WrapperStore):
    """A writer's view of a store in which ``slides/zarr.json`` is the plain group document.

    zarr checks every ancestor of a node it creates (that none is an array) by reading and
    parsing the ancestor's whole ``zarr.json``; with the listing of 30k slides in
    ``slides/zarr.json`` that would cost a second per array written. The writer creates nodes
    through this view; the listing itself is read and written through :func:`raw_store`."""

    async def get(self, key, prototype, byte_range=None):
        if key == BLOB and byte_range is None:
            return prototype.buffer.from_bytes(PLAIN_GROUP)
        return await self._store.get(key, prototype, byte_range)


def raw_store(store: Any) -> Any:
    """The store under a :class:`ShieldedStore` (the store itself otherwise)."""
    return store._store if isinstance(store, ShieldedStore) else store


def _sync(coro):
    from zarr.core.sync import sync

    return sync(coro)


def _buffer(data: bytes):
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype().buffer.from_bytes(data)


@dataclass(frozen=True)
class Marker:
    """One change marker: ``.changes/<slide_id>~<ns>-<uid>.<state>``."""

    slide_id: str
    token: str
    state: str  # "open" | "done"

    @property
    def key(self) -> str:
        return f"{CHANGES}/{self.slide_id}~{self.token}.{self.state}"

    @property
    def age(self) -> float:
        """Seconds since the marker's token was made (its first part is a time in ns)."""
        try:
            return time.time() - int(self.token.split("-", 1)[0]) / 1e9
        except ValueError:
            return float("inf")

    @classmethod
    def parse(cls, key: str) -> "Marker | None":
        name = key.rsplit("/", 1)[-1]
        sid, sep, rest = name.rpartition("~")
        token, dot, state = rest.rpartition(".")
        if not sep or not dot or state not in ("open", "done"):
            return None
        return cls(sid, token, state)


class Markers:
    """Write, list and remove change markers on any Zarr store (local directory, fsspec)."""

    def __init__(self, store: Any):
        self.store = store

    def open(self, slide_id: str) -> str:
        """Mark *slide_id* as being changed; returns the token :meth:`done` takes."""
        token = f"{time.time_ns()}-{uuid.uuid4().hex[:10]}"
        _sync(self.store.set(Marker(slide_id, token, "open").key, _buffer(b"")))
        return token

    def done(self, slide_id: str, token: str) -> None:
        """The change *token* of *slide_id* is complete (written after its completion flag)."""
        _sync(self.store.set(Marker(slide_id, token, "done").key, _buffer(b"")))
        self.remove([Marker(slide_id, token, "open")])

    def list(self) -> list[Marker]:
        async def names() -> list[str]:
            return [k async for k in self.store.list_prefix(f"{CHANGES}/")]

        try:
            keys = _sync(names())
        except FileNotFoundError:
            return []
        return [m for m in map(Marker.parse, keys) if m is not None]

    def remove(self, markers: list[Marker]) -> None:
        for m in markers:
            try:
                _sync(self.store.delete(m.key))
            except FileNotFoundError:
                pass


@dataclass
class SlideEntry:
    """What the listing knows of one slide: its tiling flag, tile count and complete feature arrays.

    ``arrays`` maps each complete key to its array's metadata as a dict (from the snapshot), or to
    None when the slide was read from its own metadata."""

    complete: bool
    n_tiles: int | None
    arrays: dict[FeatureKey, dict | None] = field(default_factory=dict)


def _key_of(attrs: dict) -> FeatureKey | None:
    if not attrs.get("complete", False):
        return None
    return FeatureKey(attrs["encoder"], attrs["weights"], int(attrs["minus"]))


def entries_from_metadata(flat: dict[str, dict]) -> dict[str, SlideEntry]:
    """Slide entries from the flat ``{path: metadata}`` of consolidated ``slides`` metadata."""
    out: dict[str, SlideEntry] = {}
    arrays: list[tuple[str, FeatureKey, dict]] = []
    for path, md in flat.items():
        parts = path.split("/")
        if len(parts) == 1 and md.get("node_type") == "group":
            attrs = md.get("attributes", {})
            n = attrs.get("n_tiles")
            out[path] = SlideEntry(bool(attrs.get("tiling_complete", False)), None if n is None else int(n))
        elif len(parts) == 3 and parts[1] == "features" and md.get("node_type") == "array":
            key = _key_of(md.get("attributes", {}))
            if key is not None:
                arrays.append((parts[0], key, md))
    for sid, key, md in arrays:
        if sid in out:
            out[sid].arrays[key] = md
    return out


def read_slide_entry(root: zarr.Group, slide_id: str) -> SlideEntry | None:
    """One slide's entry from its own (current) metadata; None when the slide does not exist."""
    try:
        g = root[f"{SLIDES}/{slide_id}"]
    except KeyError:
        return None
    n = g.attrs.get("n_tiles")
    entry = SlideEntry(bool(g.attrs.get("tiling_complete", False)), None if n is None else int(n))
    try:
        feats = g["features"]
    except KeyError:
        return entry
    for _, arr in feats.arrays():
        key = _key_of(dict(arr.attrs))
        if key is not None:
            entry.arrays[key] = None
    return entry


def walk(root: zarr.Group) -> dict[str, SlideEntry]:
    """Every slide's entry by reading every node (a store never consolidated; slow when large)."""
    try:
        grp = zarr.open_group(store=raw_store(root.store), path=SLIDES, mode="r", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return {}
    with warnings.catch_warnings():  # files of a slide being written (or of a killed writer) are not nodes
        warnings.filterwarnings("ignore", message=".*is not recognized as a component of a Zarr")
        flat = {path: node.metadata.to_dict() for path, node in grp.members(max_depth=None)}
    return entries_from_metadata(flat)


class Catalog:
    """The current listing of a store, cheap to ask again: the snapshot is parsed once per version.

    :meth:`entries` lists the markers, then reads the consolidated snapshot (re-parsed only when
    its size or the markers changed), then the marked slides from their own metadata (re-read
    only when their markers changed). A store never consolidated is walked node by node.
    """

    def __init__(self, root: zarr.Group):
        self.root = root
        self.store = raw_store(root.store)
        self.markers = Markers(self.store)
        self._base: tuple[tuple, dict[str, SlideEntry] | None] | None = None
        self._dirty: dict[str, tuple[frozenset, SlideEntry | None]] = {}
        self.consolidated: bool | None = None

    def _snapshot(self, marks: frozenset) -> dict[str, SlideEntry] | None:
        store = self.store
        try:
            size = _sync(store.getsize(BLOB))
        except FileNotFoundError:
            return None
        ident = (size, marks)
        if self._base is not None and self._base[0] == ident:
            return self._base[1]
        from zarr.core.buffer import default_buffer_prototype

        buf = _sync(store.get(BLOB, prototype=default_buffer_prototype()))
        gc_on = gc.isenabled()
        gc.disable()  # millions of small dicts: the cyclic collector would walk them over and over
        try:
            meta = json.loads(buf.to_bytes()) if buf is not None else {}
            cm = meta.get("consolidated_metadata")
            base = None if cm is None else entries_from_metadata(cm.get("metadata", {}))
            del meta, cm
        finally:
            if gc_on:
                gc.enable()
        self._base = (ident, base)
        return base

    def _read_slides(self, slide_ids: list[str]) -> list[SlideEntry | None]:
        """The marked slides' own metadata; on object storage many at once (each is a few requests)."""
        if len(slide_ids) < 4:
            return [read_slide_entry(self.root, sid) for sid in slide_ids]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, len(slide_ids))) as pool:
            return list(pool.map(lambda sid: read_slide_entry(self.root, sid), slide_ids))

    def entries(self) -> dict[str, SlideEntry]:
        """slide_id -> entry, as the store is now."""
        marks = self.markers.list()  # first: a consolidation removes markers only after its snapshot is written
        by_slide: dict[str, set[str]] = {}
        for m in marks:
            by_slide.setdefault(m.slide_id, set()).add(m.key)
        base = self._snapshot(frozenset(m.key for m in marks))
        self.consolidated = base is not None
        if base is None:
            self._dirty.clear()
            return walk(self.root)
        out = dict(base)
        stale = [sid for sid, keys in by_slide.items()
                 if sid not in self._dirty or self._dirty[sid][0] != frozenset(keys)]
        for sid, entry in zip(stale, self._read_slides(stale)):
            self._dirty[sid] = (frozenset(by_slide[sid]), entry)
        for sid in by_slide:
            cached = self._dirty[sid]
            if cached[1] is None:
                out.pop(sid, None)
            else:
                out[sid] = cached[1]
        for sid in set(self._dirty) - set(by_slide):
            del self._dirty[sid]
        return out


def consolidate(root: zarr.Group) -> tuple[int, int]:
    """Consolidate ``slides`` (zarr.consolidate_metadata), then drop the markers it covers.

    Returns (slides in the snapshot, markers removed). The caller serialises consolidations of
    one store (the writer holds a lock on local stores)."""
    store = raw_store(root.store)
    markers = Markers(store)
    listed = markers.list()
    for attempt in range(3):
        try:
            with warnings.catch_warnings(), zarr.config.set({"json_indent": None}):
                warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
                # a slide being written has files that are not (yet) nodes: its markers cover it
                warnings.filterwarnings("ignore", message=".*is not recognized as a component of a Zarr")
                grp = zarr.consolidate_metadata(store, path=SLIDES)
            break
        except (FileNotFoundError, KeyError):  # a node removed by a writer between listing and reading
            if attempt == 2:
                raise
    n = sum(1 for k in grp.metadata.consolidated_metadata.metadata if "/" not in k)
    gone = [m for m in listed if m.state == "done" or m.age > OPEN_STALE_SECONDS]
    markers.remove(gone)
    return n, len(gone)
