"""The toolkit's one plotting module: Agg figures, saved as PNG, and the shared chart types.

Every picture of every package (tiling QC, pretraining curves, MIL ROC / curves / heatmaps, CKA,
comparisons, calibration, records) is drawn on a :class:`matplotlib.figure.Figure` bound to the
Agg canvas by :func:`new_figure`: no pyplot, no GUI backend and no process-wide
``matplotlib.use`` in library code, so importing the toolkit never changes a notebook's backend
and figures are freed with their last reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float, height: float, *, dpi: float = 100.0,
               layout: str | None = "constrained") -> Figure:
    """A figure bound to the Agg canvas, independent of pyplot and of any GUI backend.

    *layout* ``"constrained"`` places the axes; pass ``None`` for figures that call
    ``fig.tight_layout()`` themselves or place a grid by hand."""
    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path, dpi: float | None = 120, **savefig) -> Path:
    """Write *fig* to *path* as PNG (parent folders made); ``dpi=None`` keeps the figure's own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi="figure" if dpi is None else dpi, **savefig)
    return path


def heatmap(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], path: str | Path,
            *, title: str = "", xlabel: str = "", ylabel: str = "", vmin: float = 0.0, vmax: float = 1.0,
            fmt: str = "{:.2f}", cmap: str = "magma") -> Path:
    """Annotated heatmap (one number per cell, text colour chosen for contrast)."""
    m = np.asarray(matrix, dtype=float)
    fig = new_figure(1.2 + 0.9 * m.shape[1], 1.0 + 0.7 * m.shape[0])
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(m.shape[1]), labels=list(col_labels), rotation=30, ha="right")
    ax.set_yticks(range(m.shape[0]), labels=list(row_labels))
    mid = (vmin + vmax) / 2
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = m[i, j]
            ax.text(j, i, "nan" if np.isnan(v) else fmt.format(v), ha="center", va="center",
                    color="black" if (not np.isnan(v) and v > mid) else "white", fontsize=9)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return save(fig, path)


def bars_with_ci(labels: Sequence[str], means: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                 path: str | Path, *, title: str = "", ylabel: str = "", highlight: int | None = None,
                 annotations: Sequence[str] | None = None, chance: float | None = 0.5) -> Path:
    """Horizontal bars with error bars [lo, hi] on the whole 0-1 scale (so bar lengths compare),
    a dashed line at *chance*; ``highlight`` marks the baseline bar."""
    means = np.asarray(means, float)
    err = np.vstack([means - np.asarray(lo, float), np.asarray(hi, float) - means])
    err = np.where(np.isfinite(err), np.maximum(err, 0), 0)
    fig = new_figure(7.0, 1.0 + 0.45 * len(means))
    ax = fig.add_subplot()
    colors = ["tab:orange" if i == highlight else "tab:blue" for i in range(len(means))]
    y = np.arange(len(means))
    ax.barh(y, means, xerr=err, color=colors, capsize=3)
    ax.set_yticks(y, labels=list(labels))
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    if chance is not None:
        ax.axvline(chance, color="0.5", lw=0.8, ls="--")
    if annotations is not None:
        for yi, text in zip(y, annotations):
            if text:
                ax.text(1.01, yi, text, va="center", ha="left", fontsize=8, clip_on=False,
                        transform=ax.get_yaxis_transform())  # x in axes units: right margin
    ax.set_xlabel(ylabel)
    ax.set_title(title, fontsize=10, wrap=True)
    return save(fig, path)


def scatter_groups(xy: np.ndarray, groups: Sequence[str], path: str | Path, *, title: str = "",
                   max_legend: int = 20) -> Path:
    """2-D scatter coloured by group label (UMAP / PCA embeddings)."""
    xy = np.asarray(xy, float)
    groups = np.asarray([str(g) for g in groups])
    fig = new_figure(6.5, 5.5)
    ax = fig.add_subplot()
    names = list(dict.fromkeys(groups.tolist()))
    s = max(2.0, 30.0 / np.sqrt(max(1, len(xy)) / 100))
    for name in names:
        m = groups == name
        ax.scatter(xy[m, 0], xy[m, 1], s=min(s, 20.0), alpha=0.7, label=name, linewidths=0)
    if len(names) <= max_legend:
        ax.legend(markerscale=2, fontsize=8, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return save(fig, path)
