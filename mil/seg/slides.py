"""Segment whole slides with a trained run: `mil seg predict-slides` (docs/segmentation.md,
"Segmenting whole slides").

Each slide is cut into windows of ``window`` px at the run's mpp (the resolution it learnt). A
window is read with ``margin`` px of context on every side, predicted, and the context dropped,
so window edges leave no seams. Only windows that meet the tissue mask (:mod:`featstore.masks`)
are segmented; the rest of the slide stays class 0. Predictions are pasted, nearest neighbour,
into one class map per slide whose longer side is at most ``max_side`` px, written in the folder
format of :mod:`mil.segmaps` (a palette PNG per slide, ``seg.json``) that `featstore view --seg`
shows over the slide, plus QuPath GeoJSON of each class's regions on request.

One slide at a time: its PNG by rename, then ``seg.json`` by rename, so an interrupted run
resumes where it stopped. A slide that cannot be read is recorded under ``skipped`` (file and
reason) and the others go on.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from featstore.core.errors import CoreError
from mil.errors import MilError
from mil.seg.config import SlidePredictConfig
from mil.seg.errors import SegError
from mil.segmaps import FORMAT, MANIFEST, class_color, read_manifest, write_manifest

log = logging.getLogger(__name__)
READ_THREADS = 2     # window reads in flight beside the model (OpenSlide releases the GIL)


@dataclass(frozen=True)
class Geometry:
    """Where a slide's windows and class map lie, in level-0 px."""

    size0: int          # window side
    margin0: int        # context on each side
    downsample: float   # level-0 px per class-map pixel
    shape: tuple[int, int]   # class map (h, w)

    @classmethod
    def of(cls, dims: tuple[int, int], slide_mpp: float, mpp: float, cfg: SlidePredictConfig) -> "Geometry":
        size0 = max(1, int(round(cfg.window * mpp / slide_mpp)))
        ds = max(size0 / cfg.window, max(dims) / cfg.max_side)
        return cls(size0, int(round(cfg.margin * size0 / cfg.window)), ds,
                   (max(1, math.ceil(dims[1] / ds)), max(1, math.ceil(dims[0] / ds))))

    def origins(self, dims: tuple[int, int]) -> np.ndarray:
        """Level-0 (x, y) of the windows tiling the whole slide, partial edge windows included; row-major."""
        xs, ys = np.arange(0, dims[0], self.size0), np.arange(0, dims[1], self.size0)
        gx, gy = np.meshgrid(xs, ys)
        return np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64)


@dataclass
class Report:
    """What a `predict-slides` call did: slides segmented now, found done, and skipped (id -> reason)."""

    done: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.skipped


def class_names(run_cfg: dict) -> dict[int, str]:
    """{id: name} of a run's classes: 0 background; a WSI run's recorded ``class_ids`` name the
    rest (several names on one id, as binary masks of several classes, are joined); label-TIFF
    values recorded as their own names become ``class <id>``."""
    n = int(run_cfg.get("classes", 2))
    plain = "foreground" if run_cfg.get("mask_kind") in ("binary", "instance") and n == 2 else None
    names = {0: "background", **{i: plain or f"class {i}" for i in range(1, n)}}
    by_id: dict[int, list[str]] = {}
    for name, cid in (run_cfg.get("class_ids") or {}).items():
        by_id.setdefault(int(cid), []).append(str(name))
    names.update({cid: " / ".join(ns) for cid, ns in by_id.items() if 0 < cid < n and ns != [str(cid)]})
    return names


def paste(cmap: np.ndarray, pred: np.ndarray, x0: float, y0: float, size0: float, ds: float) -> None:
    """Write *pred* (n x n, covering level-0 [x0, x0+size0) x [y0, y0+size0)) into *cmap* (``ds``
    level-0 px per pixel): each map pixel whose centre lies in the square takes the value there."""
    n = pred.shape[0]

    def axis(a0: float, length: int) -> tuple[int, int, np.ndarray]:
        lo, hi = max(0, math.ceil(a0 / ds - 0.5)), min(length, math.ceil((a0 + size0) / ds - 0.5))
        src = ((np.arange(lo, hi) + 0.5) * ds - a0) * n / size0
        return lo, hi, np.clip(src.astype(np.int64), 0, n - 1)

    ly, hy, sy = axis(y0, cmap.shape[0])
    lx, hx, sx = axis(x0, cmap.shape[1])
    if hy > ly and hx > lx:
        cmap[ly:hy, lx:hx] = pred[np.ix_(sy, sx)]


@functools.lru_cache(maxsize=4)
def _norm(mean: tuple, std: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's mean and std on *device*, scaled to 0-255 pixels: made once, not per batch."""
    def t(v):
        return torch.tensor(v, device=device).view(1, 3, 1, 1) * 255.0

    return t(mean), t(std)


@torch.inference_mode()
def predict_batch(model: torch.nn.Module, images: Sequence[np.ndarray], pre: dict, device: torch.device) -> np.ndarray:
    """Argmax class ids (B, H, W) uint8 of equal-sized RGB windows; AMP and channels_last on CUDA."""
    from mil.seg.train import _pad_to

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    cuda = device.type == "cuda"
    if cuda:
        x = x.pin_memory()
    x = x.to(device, non_blocking=cuda).float()
    mean, std = _norm(tuple(pre["mean"]), tuple(pre["std"]), str(device))
    x, (h, w) = _pad_to((x - mean) / std)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", enabled=cuda):
        logits = model(x)[:, :, :h, :w]
    return logits.argmax(1).to("cpu", torch.uint8).numpy()


def _tissue_windows(slide, origins: np.ndarray, g: Geometry, cfg: SlidePredictConfig, mpp: float) -> np.ndarray:
    """Which windows meet tissue (featstore's mask at the tiling resolution of a window)."""
    from featstore.tiling import TilingConfig, coverage, mask_for_slide

    tcfg = TilingConfig(patch_size=cfg.window, mpp=mpp, min_tissue=0.0, mask=cfg.mask, mask_weights=cfg.mask_weights)
    mask, ds, _ = mask_for_slide(slide, tcfg)
    x0, y0 = origins[:, 0] / ds, origins[:, 1] / ds
    return coverage(mask, x0, y0, x0 + g.size0 / ds, y0 + g.size0 / ds) > 0


def _reads(slide, origins: np.ndarray, g: Geometry, side: int, ahead: int) -> Iterator[np.ndarray]:
    """The windows (with their context) read in order, at most *ahead* in flight."""
    def read(o) -> np.ndarray:
        return slide.read_patch((int(o[0]) - g.margin0, int(o[1]) - g.margin0), g.size0 + 2 * g.margin0, side)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        pending: deque = deque()
        for o in origins:
            pending.append(pool.submit(read, o))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def segment_slide(model, pre: dict, path: Path, mpp: float, cfg: SlidePredictConfig, device: torch.device,
                  on_start: Callable[[int], None] | None = None,
                  on_window: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict]:
    """(class map uint8, its seg.json record) of one slide; *on_start* gets the number of windows
    to segment, *on_window* each batch's."""
    from featstore.read.slide import Slide

    start = time.perf_counter()
    with Slide(path, mpp=cfg.slide_mpp) as slide:
        dims, slide_mpp = slide.dimensions, slide.mpp
        g = Geometry.of(dims, slide_mpp, mpp, cfg)
        origins = g.origins(dims)
        todo = origins[_tissue_windows(slide, origins, g, cfg, mpp)]
        if on_start:
            on_start(len(todo))
        cmap = np.zeros(g.shape, np.uint8)
        m, n = cfg.margin, cfg.window
        reads = _reads(slide, todo, g, n + 2 * m, 4 * cfg.batch_size)
        for b in range(0, len(todo), cfg.batch_size):
            chunk = todo[b:b + cfg.batch_size]
            preds = predict_batch(model, [next(reads) for _ in chunk], pre, device)
            for o, p in zip(chunk, preds):
                paste(cmap, p[m:m + n, m:m + n], float(o[0]), float(o[1]), float(g.size0), g.downsample)
            if on_window:
                on_window(len(chunk))
    record = {"source": str(Path(path).resolve()), "size0": list(dims), "slide_mpp": slide_mpp, "downsample": g.downsample,
              "map": [g.shape[1], g.shape[0]], "windows": len(origins), "segmented": len(todo),
              "seconds": round(time.perf_counter() - start, 3)}
    return cmap, record


def area_mm2(cmap: np.ndarray, record: dict, names: dict[int, str]) -> dict[str, float]:
    """Each class's (id >= 1) area in mm² on the map."""
    px_mm2 = (record["downsample"] * record["slide_mpp"] / 1000.0) ** 2
    counts = np.bincount(cmap.ravel(), minlength=max(names) + 1)
    return {names[c]: round(float(counts[c]) * px_mm2, 6) for c in sorted(names) if c > 0}


def write_png(cmap: np.ndarray, path: Path, n_classes: int) -> None:
    """The class map as a palette PNG (pixel value = class id), written by rename."""
    from PIL import Image

    img = Image.fromarray(cmap, "P")
    img.putpalette([v for c in range(max(n_classes, 1)) for v in class_color(c)])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, "PNG")
    tmp.replace(path)


def write_slide_geojson(cmap: np.ndarray, record: dict, names: dict[int, str], path: Path, **props) -> Path:
    """Each class's regions (holes kept) as QuPath annotations in level-0 px."""
    from featstore.geojson import collection, tissue_features, write_geojson

    feats = [f for c in sorted(names) if c > 0
             for f in tissue_features(cmap == c, record["downsample"], name=names[c], color=class_color(c))]
    return write_geojson(collection(feats, source=record["source"], downsample=record["downsample"], **props), path)


def _manifest(out: Path, run: Path, run_cfg: dict, cfg: SlidePredictConfig, mpp: float) -> dict:
    """The folder's seg.json: a new one, or the one there when it was made by the same model and settings."""
    from featstore import __version__
    from featstore.tags import file_sha256

    names = class_names(run_cfg)
    settings = {"mpp": mpp, **{k: v for k, v in asdict(cfg).items() if k not in ("mpp", "batch_size", "device", "geojson")}}
    doc = {"format": FORMAT, "run": str(run.resolve()), "model_sha256": file_sha256(run / "model.pt"), "settings": settings,
           "classes": [{"id": c, "name": names[c], "color": list(class_color(c))} for c in sorted(names)],
           "encoder": run_cfg.get("encoder"), "arch": run_cfg.get("arch"), "featstore_version": __version__,
           "slides": {}, "skipped": {}}
    if not (out / MANIFEST).is_file():
        return doc
    try:
        old = read_manifest(out)
    except MilError as exc:
        raise SegError(str(exc)) from None
    for key in ("model_sha256", "settings"):
        if old.get(key) != doc[key]:
            raise SegError(f"{out}: holds maps made with another model or settings ({key} differs); "
                           "give another --out, or delete the folder to start again")
    return {**doc, "slides": old.get("slides", {}), "skipped": {}}


def _run_mpp(run_cfg: dict, cfg: SlidePredictConfig, run: Path) -> float:
    mpp = cfg.mpp or run_cfg.get("mpp")
    if not mpp:
        raise SegError(f"{run}: the run was trained on image folders and records no µm/px; pass --mpp "
                       "(the resolution of its training images)")
    return float(mpp)


def predict_slides(run: str | Path, slides: Sequence[str | Path], out: str | Path,
                   cfg: SlidePredictConfig = SlidePredictConfig(), progress=None) -> Report:
    """Segment every slide of *slides* (files, folders, globs, a slide list CSV) into *out*.
    *progress*: None, or a callable of the number of slides returning a context manager whose value
    has ``slide_started(id, n_windows)``, ``tiles_done(n)`` and ``slide_finished(id, status)`` (the
    extraction bars, :func:`featstore.core.ui.slide_progress`); opened once the run, the slides and
    the folder are known good, so a mistake is one line without bars."""
    from featstore.cohort import discover_slides
    from featstore.core.runtime import resolve_device
    from mil.seg.predict import load_run

    run, out = Path(run), Path(out)
    model, run_cfg, pre = load_run(run)
    if int(run_cfg["classes"]) > 256:
        raise SegError(f"{run}: {run_cfg['classes']} classes do not fit a class-map PNG (256 at most)")
    mpp = _run_mpp(run_cfg, cfg, run)
    try:
        refs = discover_slides(list(slides))
    except CoreError as exc:
        raise SegError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    doc = _manifest(out, run, run_cfg, cfg, mpp)
    device = resolve_device(cfg.device)
    model = model.to(device)
    names = {c["id"]: c["name"] for c in doc["classes"]}
    report = Report()
    with (progress(len(refs)) if progress else nullcontext()) as bars:
        for ref in refs:
            _slide_step(model, pre, ref, mpp, cfg, device, out, doc, names, bars, report)
    return report


def _slide_step(model, pre, ref, mpp, cfg, device, out: Path, doc: dict, names: dict, bars, report: Report) -> None:
    """One slide of :func:`predict_slides`: found done, segmented, or recorded as skipped."""
    sid = ref.slide_id
    if sid in doc["slides"] and (out / doc["slides"][sid]["png"]).is_file():
        report.already.append(sid)
        if cfg.geojson and not (out / f"{sid}.geojson").is_file():     # asked for on a later call
            _geojson_from_png(out, sid, doc, names)
        if bars:
            bars.slide_finished(sid, "skipped")
        return
    try:
        _one_slide(model, pre, ref, mpp, cfg, device, out, doc, names, bars)
        report.done.append(sid)
    except (CoreError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("skipped slide %s (%s): %s", sid, ref.path, reason)
        report.skipped[sid] = doc["skipped"][sid] = f"{ref.path}: {reason}"
        write_manifest(out, doc)
        if bars:
            bars.slide_finished(sid, "failed")


def _geojson_from_png(out: Path, sid: str, doc: dict, names: dict) -> None:
    from PIL import Image

    record = doc["slides"][sid]
    with Image.open(out / record["png"]) as img:
        cmap = np.asarray(img)
    write_slide_geojson(cmap, record, names, out / f"{sid}.geojson", slide_id=sid, run=doc["run"])


def _one_slide(model, pre, ref, mpp, cfg, device, out: Path, doc: dict, names: dict, progress) -> None:
    """Segment one slide and record it: the PNG (and GeoJSON) first, then seg.json."""
    sid = ref.slide_id
    slide_cfg = cfg if ref.mpp is None else SlidePredictConfig(**{**asdict(cfg), "slide_mpp": ref.mpp})
    cmap, record = segment_slide(model, pre, ref.path, mpp, slide_cfg, device,
                                 (lambda n: progress.slide_started(sid, n)) if progress else None,
                                 progress.tiles_done if progress else None)
    record = {"png": f"{sid}.png", **record, "area_mm2": area_mm2(cmap, record, names)}
    write_png(cmap, out / record["png"], len(names))
    if cfg.geojson:
        write_slide_geojson(cmap, record, names, out / f"{sid}.geojson", slide_id=sid, run=doc["run"])
    doc["slides"][sid] = record
    doc["skipped"].pop(sid, None)
    write_manifest(out, doc)
    if progress:
        progress.slide_finished(sid, "done")


__all__ = ["Geometry", "Report", "SlidePredictConfig", "area_mm2", "class_names", "paste", "predict_batch",
           "predict_slides", "segment_slide", "write_png", "write_slide_geojson"]
