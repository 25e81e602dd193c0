"""Attention heatmaps: a run's attention painted over the slide thumbnail, plus the top-k tiles.

Each fold head's raw attention is normalised per slide (rank by default, so folds with
different scales average fairly; or softmax / min-max), the folds are averaged, and every tile
is painted at its store coords (patch side ``slide_info["size0"]`` level-0 px). The top-k tiles
are read back from the WSI, so the picture shows what the model looked at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.special import softmax
from scipy.stats import rankdata

from featstore.store import Store, open_store
from mil.errors import MilError
from mil.predict import slide_attention
from mil.run import Run, load_run

log = logging.getLogger(__name__)


def _rank(a: np.ndarray) -> np.ndarray:
    return (rankdata(a, method="average") - 1) / max(len(a) - 1, 1)


def _softmax(a: np.ndarray) -> np.ndarray:
    w = softmax(a)
    return w / w.max()


def _minmax(a: np.ndarray) -> np.ndarray:
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.ones_like(a)


NORMALIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rank": _rank, "softmax": _softmax, "minmax": _minmax,
}


def combine_attention(per_fold: dict[str, np.ndarray], norm: str = "rank") -> np.ndarray:
    """Normalise each fold's raw attention to [0, 1] with *norm*, then average over folds."""
    if norm not in NORMALIZERS:
        raise MilError(f"--norm {norm!r}: choose {', '.join(NORMALIZERS)}")
    arrs = [NORMALIZERS[norm](np.asarray(a, dtype=np.float64)) for a in per_fold.values()]
    return np.mean(arrs, axis=0)


def paint(shape: tuple[int, int], coords: np.ndarray, size0: float, scores: np.ndarray,
          downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """(heat (H, W) float, covered (H, W) bool) on a thumbnail of *shape* at *downsample*."""
    h, w = shape
    heat = np.zeros((h, w), dtype=np.float32)
    covered = np.zeros((h, w), dtype=bool)
    x0 = np.floor(coords[:, 0] / downsample).astype(int)
    y0 = np.floor(coords[:, 1] / downsample).astype(int)
    side = max(1, int(np.ceil(size0 / downsample)))
    for xa, ya, s in zip(x0, y0, scores):   # overlapping tiles keep the higher score
        ys, xs = slice(max(ya, 0), min(ya + side, h)), slice(max(xa, 0), min(xa + side, w))
        heat[ys, xs] = np.maximum(heat[ys, xs], s)
        covered[ys, xs] = True
    return heat, covered


def overlay(thumb: np.ndarray, heat: np.ndarray, covered: np.ndarray, cmap: str = "jet",
            alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-mapped heat map into the thumbnail where tiles were scored."""
    from matplotlib import colormaps

    rgb = colormaps[cmap](heat)[..., :3]
    a = alpha * covered[..., None]
    out = thumb.astype(np.float32) / 255 * (1 - a) + rgb * a
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


@dataclass
class HeatmapResult:
    """What was drawn: the slide, its combined scores (rows = store coords) and the top tiles."""

    path: Path
    slide_id: str
    scores: np.ndarray
    top: np.ndarray          # row indices of the top-k tiles, best first


def resolve_slide_id(store: Store, slide_path: Path, slide_id: str | None) -> str:
    """*slide_id*, else the store slide whose recorded source is *slide_path*, else its stem."""
    ids = store.slide_ids()
    if slide_id is not None:
        if slide_id not in ids:
            raise MilError(f"{store.path} has no slide {slide_id!r}; check --slide-id")
        return slide_id
    target = slide_path.resolve()
    for sid in ids:
        src = store.slide_info(sid).get("source")
        if src and (Path(src) == slide_path or Path(src).resolve() == target):
            return sid
    by_name = [sid for sid in ids if Path(store.slide_info(sid).get("source", "")).name == slide_path.name]
    if len(by_name) == 1:
        return by_name[0]
    if slide_path.stem in ids:
        return slide_path.stem
    raise MilError(f"{store.path} has no slide made from {slide_path}; pass --slide-id "
                   f"(store slides: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''})")


def make_heatmap(run: str | Path | Run, slide_path: str | Path, store: str | Store, out: str | Path, *,
                 slide_id: str | None = None, top_k: int = 8, norm: str = "rank", max_size: int = 1024,
                 tile_px: int = 160, cmap: str = "jet", alpha: float = 0.5, mpp: float | None = None,
                 device: str = "cpu", geojson: str | Path | None = None) -> HeatmapResult:
    """Draw thumbnail | attention overlay, with the top-k tiles in a strip below, to *out* (PNG);
    with *geojson*, also the same attention as QuPath GeoJSON (:func:`attention_geojson`)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from featstore.core.plotting import new_figure, save

    from featstore.read.slide import Slide
    from featstore.read.tilesource import TileSource

    run = run if isinstance(run, Run) else load_run(run)
    st = store if isinstance(store, Store) else open_store(store)
    slide_path = Path(slide_path)
    sid = resolve_slide_id(st, slide_path, slide_id)
    per_fold = slide_attention(run, st, sid, device=device)
    scores = combine_attention(per_fold, norm)
    coords = st.coords(sid)
    info = st.slide_info(sid)
    size0 = float(info.get("size0") or 0)
    if size0 <= 0:
        raise MilError(f"{st.path}: slide {sid} records no patch size (size0); re-tile it with featstore")
    top = np.argsort(-scores, kind="stable")[:max(top_k, 0)]
    with Slide(slide_path, mpp=mpp) as slide:
        thumb, ds = slide.thumbnail(max_size)
    # the top tiles as RGB (no encoder normalisation: they are drawn, not embedded)
    with TileSource({"input_size": tile_px, "mean": (0.0,) * 3, "std": (1.0,) * 3}) as tiles_src:
        tiles_src.add(sid, slide_path, int(round(size0)), mpp)
        tiles = list(tiles_src.read_rgb(sid, coords[top]))
    heat, covered = paint(thumb.shape[:2], coords, size0, scores, ds)
    blended = overlay(thumb, heat, covered, cmap, alpha)

    h, w = thumb.shape[:2]
    n_strip = len(tiles)
    fig_w = 12.0
    top_h = fig_w / 2 * h / w
    fig = new_figure(fig_w, top_h + (fig_w / max(n_strip, 1) + 0.4 if n_strip else 0) + 0.6, dpi=110, layout=None)
    rows = 2 if n_strip else 1
    gs = fig.add_gridspec(rows, max(n_strip, 2), height_ratios=[top_h, fig_w / max(n_strip, 1)][:rows])
    half = max(n_strip, 2) // 2
    ax_t = fig.add_subplot(gs[0, :half])
    ax_h = fig.add_subplot(gs[0, half:])
    ax_t.imshow(thumb)
    ax_t.set_title(slide_title(run, sid), fontsize=10)
    ax_h.imshow(blended)
    for r, i in enumerate(top):  # outline the top tiles on the overlay
        x, y = coords[i] / ds
        side = size0 / ds
        ax_h.add_patch(_rect(x, y, side, "white"))
        ax_h.text(x, y, str(r + 1), color="white", fontsize=7, va="bottom")
    fold_txt = f"{len(run.folds)} folds" if len(run.folds) > 1 else run.folds[0]
    ax_h.set_title(f"attention ({norm}-normalised, {fold_txt}, {run.model_config.get('name')})", fontsize=10)
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=ax_h, fraction=0.04, pad=0.01)
    for ax in (ax_t, ax_h):
        ax.set_axis_off()
    for j, (i, tile) in enumerate(zip(top, tiles)):
        ax = fig.add_subplot(gs[1, j])
        ax.imshow(tile)
        ax.set_title(f"#{j + 1}  {scores[i]:.2f}", fontsize=8)
        ax.set_axis_off()
    out = save(fig, out, dpi=None, bbox_inches="tight")
    log.info("heatmap of %s (%d tiles) -> %s", sid, len(coords), out)
    if geojson is not None:
        attention_geojson(run, st, sid, per_fold, norm, geojson, slide=slide_path, mpp=mpp, device=device)
    return HeatmapResult(out, sid, scores, top)


def attention_geojson(run: Run, store: Store, sid: str, per_fold: dict[str, np.ndarray], norm: str,
                      path: str | Path, *, slide: str | Path | None = None, mpp: float | None = None,
                      device: str = "cpu") -> Path:
    """QuPath GeoJSON of a slide under a run: tissue contours, every tile with its attention
    (``attention``: the heatmap's *norm*-normalised mean over folds; ``attention_<fold>``: each
    head's raw score; ``attention_rank``: 1 = most attended) and a whole-slide annotation whose
    classification and measurements carry the run's prediction (mean of the fold heads)."""
    from featstore.geojson import feature, slide_geojson, slide_tissue, write_geojson
    from mil.predict import predict

    scores = combine_attention(per_fold, norm)
    rank = np.empty(len(scores), np.float64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    measurements = {"attention": scores, "attention_rank": rank,
                    **{f"attention_{fold}": np.asarray(a, np.float64) for fold, a in per_fold.items()}}
    if run.level == "slide":
        pred = predict(run, store, [sid], device=device)
        if hasattr(pred, "values"):
            name, values = f"{pred.column} {pred.values[0]:.3g}", {pred.column: pred.values[0]}
        else:
            name, values = pred.predicted[0], {f"P({c})": p for c, p in zip(pred.classes, pred.probs[0])}
    else:   # a patient-level head scores patients, not one slide: the title names the patient's row
        name, values = "patient prediction", {}
    info = store.slide_info(sid)
    coords, size0 = store.coords(sid), float(info["size0"])
    x0, y0 = coords.min(0)
    x1, y1 = coords.max(0) + size0
    box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    whole = feature(box, object_type="annotation", name=name, color=(200, 40, 40), measurements=values,
                    properties={"name": slide_title(run, sid), "isLocked": True})
    try:
        tissue = slide_tissue(store, sid, slide)
    except Exception as exc:  # noqa: BLE001 -- the contours are a courtesy; tiles and attention still go out
        log.warning("%s: no tissue contours in the GeoJSON (%s)", sid, exc)
        tissue = None
    doc = slide_geojson(store, sid, tissue=tissue, measurements=measurements, extra=[whole],
                        run=str(run.path), attention_norm=norm, folds=list(per_fold))
    return write_geojson(doc, path)


def slide_title(run: Run, sid: str) -> str:
    """``<slide>: true <label>, P(<positive>) = 0.87 (<fold> test)`` from the run's out-of-fold
    predictions; the slide id alone when the run never scored it (not in any test fold)."""
    from mil.run import read_predictions

    path = Path(run.path) / "predictions.csv"
    rows = read_predictions(path) if path.is_file() else []
    row = next((r for r in rows if r.get("slide_id") == sid or sid in (r.get("slides") or "").split(";")), None)
    if row is None:
        return sid
    if row.get("patient_id"):   # a --level patient run scored the slide's patient
        sid = f"{sid} (patient {row['patient_id']})"
    if run.task == "survival":
        return f"{sid}: time {row.get('time')}, event {row.get('event')}, risk {float(row['risk']):.2f} ({row.get('fold')} test)"
    if run.task == "regression":
        return f"{sid}: true {row.get('target')}, predicted {float(row['prediction']):.2f} ({row.get('fold')} test)"
    if len(run.classes) == 2:
        score = f"P({run.classes[-1]}) = {float(row['probability']):.2f}"
    else:   # multiclass: the most probable class
        probs = {c: float(row.get(f"prob_{c}") or "nan") for c in run.classes}
        best = max(probs, key=lambda c: -1.0 if probs[c] != probs[c] else probs[c])
        score = f"predicted {best} ({probs[best]:.2f})"
    return f"{sid}: true {row.get('label')}, {score} ({row.get('fold')} test)"


def _rect(x: float, y: float, side: float, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), side, side, fill=False, edgecolor=color, lw=1.0)
