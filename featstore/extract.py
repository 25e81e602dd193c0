"""The batch extractor: slides -> tiles -> ONE encoder forward -> every requested level -> store.

Threads, not processes: OpenSlide decoding, PIL resizing and torch all release the GIL, so
reader threads (one OpenSlide handle each) overlap with the encoder on the main thread, and a
writer thread keeps Zarr writes off the compute path. Batches stream across slide boundaries
(the next slide's tiles are read while the current slide's last batches run), with a bounded
number in flight so memory stays flat however many slides there are.

Image cohorts (:mod:`featstore.read.images`) run through the same loop: an
:class:`~featstore.read.images.ImageShardRef` is "tiled" by decoding each of its images once (an
unreadable one is logged, recorded in the failure log and skipped), patch ``(i, 0)`` is image ``i``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from featstore.core.errors import first_line, resource_problem
from featstore.core.runtime import resolve_device, tuned_malloc
from featstore.cohort import SlideRef
from featstore.config import ExtractConfig
from featstore.errors import FeatstoreError, StoreError
from featstore.read.images import (RESIZE_NOTE, ImageRow, ImageShard, ImageShardRef, image_failure_id, images_tiling,
                              is_image_shard, is_images_tiling, provenance_fields, shard_info, shard_rows,
                              skipped_failures)
from featstore.read.prefetch import in_thread
from featstore.stain import stained_tag
from featstore.read.native import reader_of
from featstore.store import FeatureKey, FeatureWriter, Store, open_store
from featstore.tiling import mask_provenance, tile_slide
from featstore.read.tilesource import TileSource, check_fingerprint

log = logging.getLogger(__name__)

# The resize note recorded with bilinear features, unchanged since the first stores were
# written so that their provenance still compares equal (mil predict checks it).
_RESIZE = "Slide.read_patch: best pyramid level, then PIL antialiased resize"


def resize_note(interpolation: str) -> str:
    """The provenance ``resize`` string: how a patch was brought to the encoder's input size."""
    return _RESIZE if interpolation == "bilinear" else f"{_RESIZE}, {interpolation} filter"


@dataclass
class ExtractReport:
    """What a run did: slides completed, skipped (already done or claimed elsewhere), failed.

    ``failed`` also holds the images an image shard skipped (id ``image_<path>``), so a run
    that leaves any image of the cohort out of the store is not ``ok``.
    """

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    tiles: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


class Progress(Protocol):
    """Callbacks the command uses to draw progress (all optional to implement meaningfully)."""

    def slide_started(self, slide_id: str, n_tiles: int) -> None: ...
    def tiles_done(self, n: int) -> None: ...
    def slide_finished(self, slide_id: str, status: str) -> None: ...


class _NoProgress:
    def slide_started(self, slide_id: str, n_tiles: int) -> None:
        pass

    def tiles_done(self, n: int) -> None:
        pass

    def slide_finished(self, slide_id: str, status: str) -> None:
        pass


@dataclass
class _Job:
    """One slide's work: its tiles and the levels still missing in the store."""

    ref: SlideRef
    coords: np.ndarray
    size0: int
    keys: dict[int, FeatureKey]
    lock: object
    writers: dict[int, FeatureWriter] = field(default_factory=dict)
    failed: str | None = None
    rows_done: int = 0  # rows computed and handed to the writer
    reader: str = "openslide"   # the slide reader its patches come from (featstore.read.native.open_slide)
    images: tuple[ImageRow, ...] | None = None   # an image shard: the images kept, patch (i, 0) = images[i]


class _Stop(Exception):
    """No further slide can be written (the disk is full, the store unreachable): the run stops.

    Raised with the slide in progress and the underlying error; :meth:`Extractor.run` turns it
    into one :class:`StoreError` line. Nothing half-written is visible: completion flags come last.
    """

    def __init__(self, slide_id: str, problem: str, cause: BaseException):
        super().__init__(slide_id, problem, cause)
        self.slide_id, self.problem, self.cause = slide_id, problem, cause


class _Writer:
    """A thread that owns every store write, so the encoder never waits on disk.

    A write failing for a reason of the machine (:func:`featstore.core.errors.resource_problem`) stops
    the run instead of failing slide after slide: it is kept in :attr:`fatal` for the main loop.
    """

    def __init__(self, on_done: Callable[[_Job, str | None], None], maxsize: int = 8):
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.on_done = on_done
        self.fatal: _Stop | None = None
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            kind, job, payload = item
            try:
                if job.failed or self.fatal is not None:
                    continue
                if kind == "rows":
                    for level, rows in payload.items():
                        job.writers[level].write(rows)
                elif kind == "finish":
                    for w in job.writers.values():
                        w.finish()
                    self.on_done(job, None)
            except Exception as exc:  # noqa: BLE001 -- any write failure fails this slide only
                job.failed = f"store write failed: {exc}"
                problem = resource_problem(exc)
                if problem is not None:    # ... unless no slide can be written: the run stops
                    self.fatal = _Stop(job.ref.slide_id, problem, exc)
                    continue
                self.on_done(job, job.failed)

    def put(self, kind: str, job: _Job, payload=None) -> None:
        self.q.put((kind, job, payload))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()


def _provenance(encoder, level: int, tiling: dict, slide_info: dict, precision: str, input_size: int,
                reader: str = "openslide", stain: dict | None = None) -> dict:
    from featstore import __version__
    import timm

    base = encoder.provenance() if hasattr(encoder, "provenance") else {}
    pre = encoder.preprocessing()
    return {
        **base,
        "encoder": encoder.name,
        "weights": encoder.weights_tag,
        "weights_sha256": getattr(encoder, "weights_sha256", None),
        "minus": int(level),
        "dim": int(encoder.dims[level]),
        "preprocessing": {
            **pre,
            "input_size": int(input_size),
            "resize": resize_note(str(pre.get("interpolation", "bilinear"))),
        },
        "precision": precision,
        "reader": reader,
        "stain": stain or {"method": "none"},
        "tiling": tiling,
        "slide": {
            "source": slide_info["source"],
            "fingerprint": slide_info["fingerprint"],
            "slide_mpp": slide_info["slide_mpp"],
            "size0": slide_info["size0"],
        },
        "featstore_version": __version__,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _shard_provenance(prov: dict, info: dict) -> dict:
    """An image shard's provenance: the image cohort (root, kind, fingerprint) in place of the
    slide tiling and slide, and how images are resized; everything else as for slides."""
    prov = {k: v for k, v in prov.items() if k != "slide"}
    interpolation = str(prov["preprocessing"].get("interpolation", "bilinear"))
    prov["preprocessing"] = {**prov["preprocessing"], "resize": f"{RESIZE_NOTE}, {interpolation} filter"}
    return {**prov, **provenance_fields(info)}


class Extractor:
    """Runs :class:`ExtractConfig` over slides into a store. One instance per run."""

    def __init__(self, cfg: ExtractConfig, encoder=None):
        from featstore.encoders import create_encoder, prepare_encoder, resolve_precision

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if encoder is None:
            encoder = create_encoder(cfg.encoder, weights=cfg.weights, levels=cfg.levels, seed=cfg.seed,
                                     allow_download=cfg.allow_download, strict=cfg.strict_weights)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.encoder = prepare_encoder(encoder, self.precision, self.device)
        self.input_size = int(cfg.input_size or encoder.input_size)
        self.workers = cfg.workers or self.auto_workers(self.device)
        self.levels = tuple(sorted(set(int(k) for k in cfg.levels)))
        self.stain = self._fit_stain(cfg)
        #: the features' weights tag: the encoder's, plus ``-stain-<method>-<sha8>`` with --stain
        self.feature_tag = stained_tag(self.encoder.weights_tag, self.stain)
        self._fingerprints: dict[str, str] = {}   # slide fingerprint -> first slide id of this run

    def _fit_stain(self, cfg: ExtractConfig):
        """The stain normaliser of --stain, fitted once to --stain-reference (None for none)."""
        if cfg.stain == "none":
            return None
        from featstore.stain.reference import fit_normaliser

        pre = self.encoder.preprocessing()
        norm = fit_normaliser(cfg.stain, cfg.stain_reference, tiles=cfg.stain_tiles, tiling=cfg.tiling,
                              input_size=self.input_size, slide_mpp=cfg.slide_mpp,
                              interpolation=str(pre.get("interpolation") or "bilinear"))
        log.info("stain: %s fitted to %s", cfg.stain, norm.source_)
        return norm

    @staticmethod
    def auto_workers(device: torch.device) -> int:
        """Reader threads when --workers is 0.

        On CPU the readers share the cores with the encoder; measured on 2 cores
        (densenet121 bf16, demo slides): 1 reader 34.7 tiles/s, 2 readers 27.6 tiles/s (the
        encoder's OpenMP threads get preempted). On CUDA the CPU only feeds the GPU.
        """
        import os

        if device.type == "cuda":
            return max(2, min(8, (os.cpu_count() or 2) - 1))
        return 1

    # -------------------------------------------------------------- planning
    def _keys(self) -> dict[int, FeatureKey]:
        return {lv: FeatureKey(self.encoder.name, self.feature_tag, lv) for lv in self.levels}

    def _todo(self, store: Store, ref: SlideRef) -> dict[int, FeatureKey]:
        return {lv: k for lv, k in self._keys().items()
                if not store.has_features(ref.slide_id, k.encoder, k.minus, k.weights)}

    def _prepare(self, store: Store, ref: SlideRef, report: ExtractReport, readers: TileSource) -> _Job | None:
        """Claim a slide, tile it (or reuse its stored tiling) and list the levels still to do."""
        if store.has_tiling(ref.slide_id) and not self._todo(store, ref):
            self._skip(store, ref, report)
            return None
        lock = store.lock(ref.slide_id)
        if not lock.acquire():
            report.busy.append(ref.slide_id)
            return None
        try:
            with self._open(readers, ref) as slide:
                reader = reader_of(slide)
                if store.has_tiling(ref.slide_id):
                    coords, size0 = self._stored_tiling(store, ref, slide, report)
                else:
                    coords, size0 = self._tile(store, ref, slide, report)
            todo = self._todo(store, ref)
            if not todo:
                lock.release()
                self._skip(store, ref, report)
                return None
            info = store.slide_info(ref.slide_id)
            images = tuple(shard_rows(info)[0]) if is_image_shard(info) else None
            job = _Job(ref, coords, size0, todo, lock, reader=reader, images=images)
            for lv, key in todo.items():
                prov = _provenance(self.encoder, lv, self.cfg.tiling.to_dict(), info, self.precision,
                                   self.input_size, reader, self.stain.fingerprint() if self.stain else None)
                prov = _shard_provenance(prov, info) if images is not None else prov
                job.writers[lv] = store.begin_features(ref.slide_id, key, self.encoder.dims[lv], prov)
            return job
        except Exception:
            lock.release()
            raise

    def _open(self, readers: TileSource, ref: SlideRef):
        """The slide's handle, or an image shard's :class:`~featstore.read.images.ImageShard` of all its rows."""
        if isinstance(ref, ImageShardRef):
            return readers.open(ref.path, images=ref.images)
        return readers.open(ref.path, ref.mpp if ref.mpp is not None else self.cfg.slide_mpp)

    def _skip(self, store: Store, ref: SlideRef, report: ExtractReport) -> None:
        """Count a complete slide as skipped. A complete image shard is first checked against
        its folder (a stat per image: an added, removed or resized file is a changed shard) and
        the images it skipped stay failures of this run."""
        if isinstance(ref, ImageShardRef):
            info = store.slide_info(ref.slide_id)
            check_fingerprint(ImageShard(ref.path, ref.images), info.get("fingerprint"),
                              f"the store as {ref.slide_id!r}", "use a new store")
            store.clear_failure(ref.slide_id)
            self._report_skipped_images(store, ref, info, report)
        report.skipped.append(ref.slide_id)

    def _stored_tiling(self, store: Store, ref: SlideRef, slide, report: ExtractReport) -> tuple[np.ndarray, int]:
        """The stored coords of a slide tiled before, once its file is checked to be the same."""
        info = store.slide_info(ref.slide_id)
        shard = isinstance(ref, ImageShardRef)
        if is_image_shard(info) != shard:
            held = "an image shard" if is_image_shard(info) else "a slide"
            raise FeatstoreError(f"{ref.slide_id}: the store holds it as {held}; use a new store")
        check_fingerprint(slide, info.get("fingerprint"), f"the store as {ref.slide_id!r}",
                          "use a new store" if shard else "use a new store or a different slide id")
        if shard:
            self._report_skipped_images(store, ref, info, report)
        return store.coords(ref.slide_id), int(info["size0"])

    def _warn_if_seen(self, ref: SlideRef, fingerprint: dict) -> None:
        """Say when two slide ids of this run are copies of one file (same size and hashed ends)."""
        key = json.dumps(fingerprint, sort_keys=True)
        seen = self._fingerprints.setdefault(key, ref.slide_id)
        if seen != ref.slide_id:
            log.warning("slide %s (%s) is a copy of slide %s (same size and content hash): it is extracted again "
                        "under its own id; drop one copy if that is not intended", ref.slide_id, ref.path, seen)

    def _tile(self, store: Store, ref: SlideRef, slide, report: ExtractReport) -> tuple[np.ndarray, int]:
        """Tile a slide (or decode a shard's images) and write its tiling; returns (coords, size0)."""
        if isinstance(slide, ImageShard):
            return self._tile_images(store, ref, slide, report)
        tiles = tile_slide(slide, self.cfg.tiling)
        if len(tiles.coords) == 0 and tiles.qc_dropped:
            raise FeatstoreError(f"{ref.path}: --qc drop left no tile ({tiles.qc_summary()}); check with "
                                 "`featstore tiles --qc flag`")
        if len(tiles.coords) == 0:
            raise FeatstoreError(
                f"{ref.path}: no tissue (no patch with >= {self.cfg.tiling.min_tissue:.0%} tissue); "
                "check with `featstore tiles`"
            )
        fingerprint = slide.fingerprint()
        self._warn_if_seen(ref, fingerprint)
        info = {
            "source": str(ref.path), "fingerprint": fingerprint, "slide_mpp": float(tiles.slide_mpp),
            "size0": int(tiles.size0), "tiling": self.cfg.tiling.to_dict(),
            "dimensions": list(slide.dimensions), "vendor": slide.vendor, **mask_provenance(self.cfg.tiling),
        }
        if tiles.qc_flags is not None:
            from featstore.tileqc import qc_counts

            info["qc"] = {"flagged": qc_counts(tiles.qc_flags), "dropped": tiles.qc_dropped or {}}
        store.write_tiling(ref.slide_id, tiles.coords, tiles.tissue, info, qc=tiles.qc, qc_flags=tiles.qc_flags)
        return tiles.coords, int(tiles.size0)

    def _tile_images(self, store: Store, ref: ImageShardRef, shard: ImageShard,
                     report: ExtractReport) -> tuple[np.ndarray, int]:
        """Decode every image once; record the unreadable ones, write the rest as coords (i, 0)."""
        kept, bad = shard.check()
        for row, reason in bad.items():
            self._fail_image(store, ref, row, reason, report)
        if not kept:
            raise FeatstoreError(f"{ref.path}: shard {ref.slide_id}: none of its {len(ref.images)} images is readable")
        coords = np.stack([np.arange(len(kept)), np.zeros(len(kept))], axis=1).astype(np.int32)
        store.write_tiling(ref.slide_id, coords, np.ones(len(kept), np.float32),
                           shard_info(shard, kept, bad, ref.shard_size))
        return coords, 0

    def _fail_image(self, store: Store, ref: ImageShardRef, row: ImageRow, reason: str, report: ExtractReport) -> None:
        """One unreadable image: one log line (file + reason), the failure log, the report."""
        fid = image_failure_id(row)
        log.error("%s", reason)
        report.failed[fid] = reason
        try:
            store.record_failure(fid, reason, str(row.file(ref.path)))
        except Exception as exc:  # noqa: BLE001 -- the failure log itself must not stop the batch
            log.error("could not record failure of %s: %s", fid, exc)

    def _report_skipped_images(self, store: Store, ref: ImageShardRef, info: dict, report: ExtractReport) -> None:
        """A resumed shard's images skipped when it was tiled: still failures of this run."""
        skipped = {image_failure_id(ImageRow.from_dict(d)): d for d in info.get("skipped", [])}
        for fid, reason in skipped_failures(info).items():
            if fid not in report.failed:
                self._fail_image(store, ref, ImageRow.from_dict(skipped[fid]), reason, report)

    # -------------------------------------------------------------- running
    def _batches(self, store: Store, refs: list[SlideRef], report: ExtractReport, readers: TileSource,
                 progress: Progress) -> Iterator[tuple[list[tuple[_Job, int, int]], Future]]:
        """Yield (segments, future batch) in order with a bounded window of reads in flight.

        Batches are packed to exactly ``batch_size`` tiles across slide boundaries: every
        forward pass has the same shape (oneDNN/cuDNN reuse their kernels; a small slide's
        partial batch would otherwise cost a new kernel plan), and the next slide's tiles are
        read while the current slide's last tiles run.
        """
        window: deque[tuple[list, Future]] = deque()
        max_in_flight = max(2, 2 * readers.workers)
        bs = self.cfg.batch_size
        pending: list[tuple[_Job, int, int]] = []
        fill = 0

        def flush():
            nonlocal pending, fill
            segs = pending
            fut = readers.submit_batch([(job.ref.slide_id, job.coords[b:e]) for job, b, e in segs],
                                       skip=lambda i: bool(segs[i][0].failed))
            window.append((segs, fut))
            pending, fill = [], 0

        for ref in refs:
            try:
                job = self._prepare(store, ref, report, readers)
            except Exception as exc:
                problem = resource_problem(exc)
                if problem is not None:
                    raise _Stop(ref.slide_id, problem, exc) from exc
                if not isinstance(exc, (FeatstoreError, OSError)):
                    raise
                self._fail(store, ref, str(exc), report, progress)
                continue
            if job is None:  # already complete, or claimed by another process
                progress.slide_finished(ref.slide_id, "skipped")
                continue
            self._open_jobs.append(job)
            readers.add(ref.slide_id, ref.path, job.size0, ref.mpp, reader=job.reader, images=job.images)
            progress.slide_started(ref.slide_id, len(job.coords))
            pos, n = 0, len(job.coords)
            while pos < n:
                take = min(bs - fill, n - pos)
                pending.append((job, pos, pos + take))
                fill += take
                pos += take
                if fill == bs:
                    flush()
                while len(window) > max_in_flight:
                    yield window.popleft()
        if pending:
            flush()
        while window:
            yield window.popleft()

    def _fail(self, store: Store, ref: SlideRef, reason: str, report: ExtractReport, progress: Progress) -> None:
        reason = reason.splitlines()[0] if reason else "unknown error"
        log.error("%s: %s", ref.slide_id, reason)
        report.failed[ref.slide_id] = reason
        try:
            store.record_failure(ref.slide_id, reason, str(ref.path))
        except Exception as exc:  # noqa: BLE001 -- the failure log itself must not stop the batch
            log.error("could not record failure of %s: %s", ref.slide_id, exc)
        progress.slide_finished(ref.slide_id, "failed")

    def run(self, refs: list[SlideRef], store: Store | str, progress: Progress | None = None,
            consolidate: bool = True) -> ExtractReport:
        """Extract every slide in *refs* into *store*; failed slides are logged and skipped.

        When a slide was done the store's listing is consolidated at the end (one read to open it
        next time); distributed tasks pass ``consolidate=False`` and the client does it once."""
        import time

        t0 = time.perf_counter()
        progress = progress or _NoProgress()
        store = store if isinstance(store, Store) else open_store(store, mode="a")
        store.set_tiling(store_tiling(self.cfg, refs, store))
        report = ExtractReport()
        preprocessing = {**self.encoder.preprocessing(), "input_size": self.input_size}
        cuda = self.device.type == "cuda"
        readers = TileSource(preprocessing, workers=self.workers, pin=cuda, slide_mpp=self.cfg.slide_mpp,
                             reader=self.cfg.reader, decode_device=self.device if cuda else None,
                             stain=self.stain)
        self._open_jobs: list[_Job] = []
        stop: _Stop | None = None
        try:
            with tuned_malloc(self.cfg.tune_malloc and self.device.type == "cpu"):
                self._run(refs, store, readers, report, progress)
        except _Stop as exc:
            stop = exc
        finally:   # also on Ctrl-C: no claim of an unfinished slide outlives the run
            self._release_open(store, drop_partial=stop is not None and stop.problem != "unreachable")
            readers.close()
        if stop is not None:
            raise self._stopped(store, stop) from None
        if consolidate and report.done:
            store.consolidate()
        report.seconds = time.perf_counter() - t0
        return report

    def _stopped(self, store: Store, stop: _Stop) -> StoreError:
        """The one line of a run stopped by the machine (disk full, store unreachable)."""
        what = f"the store {store.path} is unreachable" if stop.problem == "unreachable" else \
            f"{stop.problem} writing {store.path}"
        then = "rerun when it answers again" if stop.problem == "unreachable" else "free some space and rerun"
        return StoreError(f"{what} ({first_line(stop.cause)}) at slide {stop.slide_id}; slides completed before "
                          f"are kept, unfinished ones are not marked complete: {then} to resume")

    def _release_open(self, store: Store, drop_partial: bool) -> None:
        """After a stopped or interrupted run: drop the claims of the slides still in flight (and
        their partial arrays with *drop_partial*: on a full disk, to give the space back). Those
        slides are not complete, so a rerun redoes them."""
        for job in self._open_jobs:
            for key in job.keys.values() if drop_partial else ():
                try:
                    store.delete_features(job.ref.slide_id, key)
                except Exception:  # noqa: BLE001 -- best effort: a partial array is invisible anyway
                    pass
            job.lock.release()
        self._open_jobs = []

    @torch.inference_mode()
    def _run(self, refs: list[SlideRef], store: Store, readers: TileSource, report: ExtractReport,
             progress: Progress) -> None:
        """The hot loop: planned batches -> encoder -> rows handed to the writer thread."""
        from featstore.encoders import autocast

        cuda = self.device.type == "cuda"
        done_lock = threading.Lock()

        def on_done(job: _Job, error: str | None) -> None:
            with done_lock:
                if error:
                    self._abort(store, job, error, report, progress)
                else:
                    store.clear_failure(job.ref.slide_id)
                    job.lock.release()
                    self._forget(job)
                    report.done.append(job.ref.slide_id)
                    progress.slide_finished(job.ref.slide_id, "done")

        writer = _Writer(on_done)
        try:
            for segments, fut in in_thread(self._batches(store, refs, report, readers, progress), name="planner"):
                if writer.fatal is not None:
                    break
                if all(job.failed for job, _, _ in segments):
                    fut.cancel()
                    continue
                x, errors = fut.result()
                for si, reason in errors.items():
                    with done_lock:
                        self._abort(store, segments[si][0], reason, report, progress)
                x = x.to(self.device, non_blocking=cuda)
                with autocast(self.precision, self.device):
                    out = self.encoder(x)
                out = {lv: t.float().cpu().numpy().astype(np.float16) for lv, t in out.items()}
                row = 0
                for job, b, e in segments:
                    if not job.failed:
                        writer.put("rows", job, {lv: out[lv][row:row + e - b] for lv in job.keys})
                        job.rows_done += e - b
                        if job.rows_done == len(job.coords):
                            writer.put("finish", job)
                    row += e - b
                report.tiles += len(x)
                progress.tiles_done(len(x))
        finally:
            writer.close()
        if writer.fatal is not None:
            raise writer.fatal

    def _abort(self, store: Store, job: _Job, reason: str, report: ExtractReport, progress: Progress) -> None:
        """Fail one slide mid-run: drop its partial arrays, release its claim, log the reason."""
        if job.failed and job.ref.slide_id in report.failed:
            return
        job.failed = reason
        for key in job.keys.values():
            try:
                store.delete_features(job.ref.slide_id, key)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not remove partial features of %s: %s", job.ref.slide_id, exc)
        job.lock.release()
        self._forget(job)
        self._fail(store, job.ref, reason, report, progress)

    def _forget(self, job: _Job) -> None:
        try:
            self._open_jobs.remove(job)
        except ValueError:
            pass


def store_tiling(cfg: ExtractConfig, refs: list[SlideRef], store: Store) -> dict:
    """The store-level tiling of this run: the slide TilingConfig, or the image cohort's
    record; images and slides never share a run or a store (one-line error)."""
    shards = [r for r in refs if isinstance(r, ImageShardRef)]
    if shards and len(shards) < len(refs):
        raise FeatstoreError("one run extracts either image shards or slides, not both; use one store for each")
    stored = store.tiling
    if refs and stored is not None and is_images_tiling(stored) != bool(shards):
        have, want = ("image shards", "slides") if is_images_tiling(stored) else ("slides", "images")
        raise FeatstoreError(f"{store.path} holds {have}; {want} cannot share it, use a new store")
    if not shards:
        return cfg.tiling.to_dict()
    sizes = sorted({r.shard_size for r in shards})
    if len(sizes) > 1:
        raise FeatstoreError(f"image shards of several shard sizes ({sizes}) in one run")
    return images_tiling(sizes[0])


def extract(refs: list[SlideRef], store: Store | str, cfg: ExtractConfig,
            progress: Progress | None = None) -> ExtractReport:
    """Convenience wrapper: build an :class:`Extractor` for *cfg* and run it."""
    return Extractor(cfg).run(refs, store, progress)
