"""What the viewer shows, read once per slide: the slide file (only inside the allowed folders),
its deep-zoom generator, and a run's attention painted as an overlay image."""

from __future__ import annotations

import io
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mil.errors import MilError

log = logging.getLogger(__name__)

OVERLAY_PX_PER_TILE = 4       # overlay image pixels per tile side: sharp tile edges, small PNGs
DZ_TILE, DZ_OVERLAP = 254, 1  # deep-zoom tiles of 256 px with their 1-px overlap


class ViewerError(MilError):
    """A request the viewer cannot serve (unknown slide, a file outside the allowed folders)."""


@dataclass
class ViewerData:
    """The store, the runs (by folder name; the first is the default), the folders slide files
    may be read from, and class maps (:class:`mil.viewer.seg.SegMaps`). ``run`` is the default
    run, or None. Without a store the slides are the class maps' (segmentation only)."""

    store: object | None
    runs: dict = field(default_factory=dict)
    slide_dirs: tuple[Path, ...] = ()
    device: str = "cpu"
    seg: object | None = None
    _zoom: dict = field(default_factory=dict, repr=False)
    _scores: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.runs is None:
            self.runs = {}
        elif not isinstance(self.runs, dict):     # one run given
            self.runs = {Path(self.runs.path).name: self.runs}
        if self.store is None and (self.seg is None or self.runs):
            raise ViewerError("give a feature store (a --run's attention needs one), or --seg class maps alone")

    @property
    def title(self) -> str:
        return str(self.store.path if self.store is not None else self.seg.folder)

    @property
    def run(self):
        return next(iter(self.runs.values()), None)

    def get_run(self, name: str | None):
        """The run called *name* (a run folder name), the default run for None."""
        if name is None:
            return self.run
        if name not in self.runs:
            raise ViewerError(f"no run {name!r} (runs: {', '.join(self.runs) or 'none'})")
        return self.runs[name]

    def slide_ids(self) -> list[str]:
        return list(self.store.slide_ids()) if self.store is not None else self.seg.slide_ids()

    def info(self, sid: str) -> dict:
        """The store's record of a slide (source, size0, ...); the class map's without a store."""
        if self.store is not None:
            return self.store.slide_info(sid)
        return self.seg.record(sid) or {}

    def n_tiles(self, sid: str) -> int | None:
        return None if self.store is None else self.store.n_tiles(sid)

    def has_seg(self, sid: str) -> bool:
        return self.seg is not None and self.seg.record(sid) is not None

    def check(self, sid: str) -> str:
        """*sid* if the store holds it (ids, never paths, come from a request)."""
        if sid not in set(self.slide_ids()):
            raise ViewerError(f"no slide {sid!r} in {self.title}")
        return sid

    def slide_path(self, sid: str) -> Path:
        """The slide's file: the source the store recorded, or a file of that name under a
        --slides folder; never a path outside those folders (symlinks resolved)."""
        src = Path(str(self.info(self.check(sid)).get("source", "")))
        if not self.slide_dirs:
            if not src.is_file():
                raise ViewerError(f"slide file {src} of {sid} is not there; pass --slides DIR")
            return src
        roots = [d.resolve() for d in self.slide_dirs]
        candidates = [src] + [d / src.name for d in self.slide_dirs]
        for c in candidates:
            real = c.resolve()
            if real.is_file() and any(real.is_relative_to(r) for r in roots):
                return real
        raise ViewerError(f"slide file of {sid} ({src.name}) is not inside {', '.join(map(str, self.slide_dirs))}")

    def zoom(self, sid: str):
        """The slide's DeepZoomGenerator (opened once, kept)."""
        with self._lock:
            if sid not in self._zoom:
                from openslide.deepzoom import DeepZoomGenerator

                from featstore.read.slide import open_handle

                try:
                    self._zoom[sid] = DeepZoomGenerator(open_handle(self.slide_path(sid)), tile_size=DZ_TILE,
                                                        overlap=DZ_OVERLAP, limit_bounds=False)
                except ViewerError:
                    raise
                except Exception as exc:  # noqa: BLE001 -- OpenSlide's errors name no slide
                    raise ViewerError(f"{sid}: the slide file cannot be opened ({exc})") from None
            return self._zoom[sid]

    def scores(self, sid: str, run: str | None = None) -> np.ndarray | None:
        """A run's attention of every tile (rank-normalised mean over folds, as `mil heatmap`)."""
        r = self.get_run(run)
        if r is None:
            return None
        key = (str(r.path), sid)
        with self._lock:
            if key not in self._scores:
                from mil.heatmap import combine_attention
                from mil.predict import slide_attention

                self._scores[key] = combine_attention(slide_attention(r, self.store, sid, device=self.device), "rank")
            return self._scores[key]

    def overlay_png(self, sid: str, size0_wh: tuple[int, int], run: str | None = None) -> bytes:
        """RGBA PNG of the attention (jet), transparent where there is no tile; it spans the
        whole slide (*size0_wh*, level-0 px) at OVERLAY_PX_PER_TILE pixels per tile side."""
        from matplotlib import colormaps
        from PIL import Image

        from mil.heatmap import paint

        info = self.store.slide_info(sid)
        size0 = float(info["size0"])
        ds = size0 / OVERLAY_PX_PER_TILE
        w, h = (int(np.ceil(v / ds)) for v in size0_wh)
        scores = self.scores(sid, run)
        heat, covered = paint((h, w), self.store.coords(sid), size0, scores, ds)
        rgba = (colormaps["jet"](heat) * 255).astype(np.uint8)
        rgba[..., 3] = np.where(covered, 255, 0)
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, "PNG")
        return buf.getvalue()

    def top_tiles(self, sid: str, k: int = 8, run: str | None = None) -> list[dict]:
        """The k most attended tiles: level-0 box and score, best first."""
        scores = self.scores(sid, run)
        if scores is None:
            return []
        coords, size0 = self.store.coords(sid), int(self.store.slide_info(sid)["size0"])
        top = np.argsort(-scores, kind="stable")[:k]
        return [{"rank": r + 1, "row": int(i), "x": int(coords[i][0]), "y": int(coords[i][1]), "size": size0,
                 "score": float(scores[i])} for r, i in enumerate(top)]


def error_tile(text: str, size: int = 256) -> bytes:
    """A JPEG saying what went wrong, served in place of a slide's tiles."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (90, 20, 20))
    draw = ImageDraw.Draw(img)
    words, line, y = text.split(), "", 8
    for word in words:   # wrap at about 36 characters
        if len(line) + len(word) > 36:
            draw.text((8, y), line, fill=(255, 230, 230))
            line, y = "", y + 14
        line = f"{line} {word}".strip()
    draw.text((8, y), line, fill=(255, 230, 230))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def run_rows(run) -> dict[str, dict]:
    """{slide_id: predictions.csv row} of a run (patient rows stand for each of their slides)."""
    if run is None:
        return {}
    from mil.run import read_predictions

    path = Path(run.path) / "predictions.csv"
    rows = read_predictions(path) if path.is_file() else []
    out = {}
    for r in rows:
        for sid in (r["slides"].split(";") if r.get("slides") else [r.get("slide_id", "")]):
            out[sid] = r
    return out


def summary(run) -> list[tuple[str, str]]:
    """(metric, mean ± sd) of a run's headline metrics."""
    if run is None or not run.metrics:
        return []
    from mil.tasks import task_keys

    m = run.metrics
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return [(k, f"{fmt(m['mean'].get(k))} ± {fmt(m['std'].get(k))}") for k in task_keys(run.task)]


def _is_segmentation(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "config.json").read_text()).get("kind") == "segmentation"
    except (OSError, ValueError, AttributeError):
        return False


def find_runs(paths) -> dict:
    """{folder name: Run} of run folders, or of the run folders inside a folder (a study's runs/)."""
    from mil.run import load_run

    out = {}
    for p in map(Path, paths):
        found = [p] if (p / "config.json").is_file() else sorted(d for d in p.iterdir() if (d / "config.json").is_file()) \
            if p.is_dir() else []
        if not found:
            raise ViewerError(f"--run {p}: no run folder here (a folder holding config.json, or a folder of them)")
        for d in found:
            if _is_segmentation(d):
                raise ViewerError(f"--run {d}: a segmentation run; segment the slides with `mil seg predict-slides "
                                  f"SLIDES --run {d} --out MAPS` and show the maps with --seg MAPS")
            out[d.name] = load_run(d)
    return out


__all__ = ["find_runs", "ViewerData", "ViewerError", "error_tile", "run_rows", "summary", "OVERLAY_PX_PER_TILE"]
