"""Extraction on a dask.distributed cluster: one task per slide, written straight into the shared store.

The client records the store's tiling once, then submits one task per slide. The scheduler
gives each task to exactly one worker (claim-once); a worker keeps one
:class:`~featstore.extract.Extractor` per process (cached by config, so the encoder is built once)
and runs it on its slide, with the same completion flags as the single-process path: a slide's
arrays become visible only when complete. When a worker dies mid-slide, dask reruns the task
elsewhere (up to the scheduler's ``distributed.scheduler.allowed-failures``); the rerun recreates
the partial arrays (``StoreWriter.begin_features``) and, on local stores, takes over the dead process's
slide lock. Results come back with :func:`distributed.as_completed` for progress and the failure
summary. Recipes for SLURM / Kubernetes and the throughput model: docs/scale-out.md.

This is library code: progress goes through the :class:`featstore.extract.Progress` protocol;
the command (`featstore extract --cluster`, console and bars) is ``featstore.commands.extract``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from featstore.core.errors import first_line
from featstore.core.runtime import cpu_threads
from featstore.cohort import SlideRef
from featstore.errors import ClusterError, FeatstoreError
from featstore.extract import ExtractConfig, Extractor, ExtractReport, Progress, _NoProgress, store_tiling
from featstore.read.remote import remote_options, store_location
from featstore.store import open_store_writer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterSpec:
    """Where tasks run: an existing scheduler ``address``, or a LocalCluster of ``n_workers`` processes."""

    address: str | None = None
    n_workers: int = 0
    threads_per_worker: int = 1

    @property
    def local(self) -> bool:
        return self.address is None

    @classmethod
    def parse(cls, text: str, threads_per_worker: int = 1) -> "ClusterSpec":
        """``local:N`` (N worker processes), ``local:N:T`` (T threads each) or a scheduler address."""
        s = text.strip()
        if s.startswith("local"):
            parts = s.split(":")
            try:
                n = int(parts[1]) if len(parts) > 1 and parts[1] else 1
                t = int(parts[2]) if len(parts) > 2 else threads_per_worker
            except ValueError:
                n = t = 0
            if len(parts) > 3 or n < 1 or t < 1:
                raise ClusterError(f"--cluster {text!r}: write local:N (N worker processes) or local:N:T "
                                   "(T threads each), e.g. local:2")
            return cls(None, n, t)
        if not s:
            raise ClusterError("--cluster is empty: give a scheduler address (tcp://host:8786) or local:N")
        return cls(s if "://" in s else f"tcp://{s}")


@contextmanager
def connect(spec: ClusterSpec | str, *, timeout: float = 30.0) -> Iterator[Any]:
    """A ``distributed.Client`` for *spec*; a LocalCluster it starts is closed on exit.

    Local workers are processes with a nanny (a killed worker is restarted) and declare one
    ``GPU`` resource each when CUDA is available, so slide tasks go one per GPU.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ClusterError("--cluster needs dask.distributed: pip install 'featstore[distributed]'") from None
    spec = ClusterSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.local:
        resources = {"GPU": 1} if torch.cuda.is_available() else None
        cluster = LocalCluster(n_workers=spec.n_workers, threads_per_worker=spec.threads_per_worker,
                               processes=True, resources=resources, dashboard_address=None,
                               silence_logs=logging.WARNING)
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = Client(spec.address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"--cluster {spec.address}: cannot reach the dask scheduler ({exc}); "
                           "start one with `dask scheduler` or use local:N") from None
    try:
        yield client
    finally:
        client.close()


# ---------------------------------------------------------------- worker side
_CACHE: dict[tuple, Extractor] = {}
_CACHE_LOCK = threading.Lock()


def _worker_device(cfg: ExtractConfig, gpu_by_name: bool) -> str:
    """On a LocalCluster we started, worker ``k`` takes GPU ``k``; elsewhere the worker's default."""
    if cfg.device != "auto" or not gpu_by_name or not torch.cuda.is_available():
        return cfg.device
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ValueError, TypeError):
        return cfg.device
    return f"cuda:{index % torch.cuda.device_count()}"


def _extractor(cfg: ExtractConfig, torch_threads: int | None, gpu_by_name: bool) -> Extractor:
    """This process's extractor for *cfg* (the encoder is created once per worker and config)."""
    cfg = replace(cfg, device=_worker_device(cfg, gpu_by_name))
    key = (cfg, torch_threads)
    with _CACHE_LOCK:
        ex = _CACHE.get(key)
        if ex is None:
            _CACHE.clear()  # one config at a time: do not keep old encoders in memory
            ex = _CACHE[key] = Extractor(cfg)
        return ex


def extract_slide_task(ref: SlideRef, store: str, cfg: ExtractConfig, storage_options: dict | None = None,
                       torch_threads: int | None = None, busy_wait: float = 150.0, gpu_by_name: bool = False) -> dict:
    """Run on a worker: extract one slide into the shared store; return its outcome as plain data.

    A slide claimed by another process (a live lock, or a dead worker's lock on a shared
    filesystem not yet stale) is retried until ``busy_wait`` seconds have passed.
    """
    ex = _extractor(cfg, torch_threads, gpu_by_name)
    deadline = time.monotonic() + busy_wait
    with cpu_threads(torch_threads or 0):  # the worker's own setting is put back after the task
        while True:
            rep = ex.run([ref], open_store_writer(store, storage_options=storage_options), consolidate=False)
            if not rep.busy or time.monotonic() >= deadline:
                break
            time.sleep(min(5.0, max(0.1, busy_wait / 30)))
    status = ("failed" if rep.failed else "done" if rep.done else "skipped" if rep.skipped else "busy")
    try:
        from distributed import get_worker

        worker = get_worker().address
    except ValueError:  # called outside a worker (tests, debugging)
        worker = "local"
    return {"slide_id": ref.slide_id, "status": status, "reason": rep.failed.get(ref.slide_id, ""),
            "tiles": rep.tiles, "seconds": rep.seconds, "worker": worker, "pid": os.getpid()}


# ---------------------------------------------------------------- client side
def _gpu_workers(client) -> bool:
    workers = client.scheduler_info().get("workers", {})
    return any("GPU" in (w.get("resources") or {}) for w in workers.values())


def task_key(slide_id: str) -> str:
    """The dask key of a slide's task (also how tests find which worker runs a slide)."""
    return f"featstore-extract-{slide_id}"


def extract_distributed(refs: list[SlideRef], store: str | Path, cfg: ExtractConfig, client, *,
                        storage_options: dict | None = None, progress: Progress | None = None,
                        torch_threads: int | None = None, gpu_by_name: bool = False,
                        busy_wait: float = 150.0) -> ExtractReport:
    """Extract *refs* into *store* with one task per slide on *client*'s cluster.

    Failed slides (including a slide whose worker died more than the scheduler's allowed
    failures) go into the report and the store's failure log; any other task error stops the
    run with :class:`ClusterError`.
    """
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    t0 = time.perf_counter()
    progress = progress or _NoProgress()
    location = store_location(store)
    options = remote_options(location, storage_options)
    # the writer creates slides/ and failures/ as it opens, before tasks could race to create
    # them (two require_group calls on a fresh S3 store: zarr ContainsGroupError)
    st = open_store_writer(location, storage_options=options)
    st.set_tiling(store_tiling(cfg, refs, st))  # once, before any task: workers only check it
    # resolved paths; an image shard (ImageShardRef) keeps its rows: one task per shard
    refs = [replace(r, path=Path(r.path).expanduser().resolve()) for r in refs]
    if len({r.slide_id for r in refs}) != len(refs):
        raise FeatstoreError("two slides share one slide id; give them distinct ids (CSV slide_id,path)")
    resources = {"GPU": 1} if _gpu_workers(client) else None
    futures = {}
    for i, ref in enumerate(refs):
        fut = client.submit(extract_slide_task, ref, location, cfg, options, torch_threads, busy_wait, gpu_by_name,
                            key=f"{task_key(ref.slide_id)}-{os.urandom(4).hex()}", pure=False,
                            resources=resources, priority=-i)
        futures[fut] = ref
    report = ExtractReport()
    try:
        for fut in as_completed(list(futures)):
            ref = futures[fut]
            try:
                out = fut.result()
            except KilledWorker:
                reason = (f"{ref.path}: its worker died on every attempt (out of memory or a crash); "
                          "extract it alone to see the error")
                report.failed[ref.slide_id] = reason
                st.record_failure(ref.slide_id, reason, str(ref.path))
                progress.slide_finished(ref.slide_id, "failed")
                continue
            except Exception as exc:  # noqa: BLE001 -- not a slide error: stop the whole run
                msg = first_line(exc)
                raise ClusterError(f"{ref.slide_id}: task failed on the cluster ({msg})") from exc
            status = out["status"]
            if status == "done":
                report.done.append(ref.slide_id)
            elif status == "skipped":
                report.skipped.append(ref.slide_id)
            elif status == "busy":
                report.busy.append(ref.slide_id)
            else:
                report.failed[ref.slide_id] = out["reason"]
            report.tiles += out["tiles"]
            if out["tiles"]:
                progress.slide_started(ref.slide_id, out["tiles"])
                progress.tiles_done(out["tiles"])
            progress.slide_finished(ref.slide_id, status)
    finally:
        client.cancel([f for f in futures if not f.done()])
    report.seconds = time.perf_counter() - t0
    return report
