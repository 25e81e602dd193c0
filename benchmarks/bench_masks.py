"""Tissue-mask benchmark (issue 30): each classical ``--mask`` method on slides with a known truth.

    python benchmarks/bench_masks.py              # 3 messy slides + 8 IHC-like views
    python benchmarks/bench_masks.py --seeds 5

Messy slides (featstore.messy: two sections, a faint part, a fold, a blurred patch, pen ink in three
colours, marker dots, bubble rims) are written as pyramidal TIFFs at 8 µm/px and tiled through
OpenSlide with 32 px tiles (min_tissue 0.5). IHC-like views are haematoxylin (faint to dense) with
or without DAB, drawn with Ruifrok's stain vectors. Rows, measured in this run:
- dice <method>        : Dice of the mask vs the truth (min over messy slides); ratio = robust's ÷ it
- ink tile <method>    : the largest ink share of a kept tile; ratio = the share (0 = no tile on ink)
- glass tile <method>  : the least truth tissue in a kept tile; ratio = that share
- faint kept <method>  : share of the faint part inside the mask
- ihc dice <method>    : the lowest Dice over the IHC-like views
- time <method>        : seconds per slide (thumbnail read + mask + tiles); ratio = ÷ saturation's
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402

from featstore.messy import ihc_view, messy_slide  # noqa: E402
from featstore.read.slide import Slide  # noqa: E402
from featstore.synth import write_pyramid_tiff  # noqa: E402
from featstore.tiling import TilingConfig, mask_and_artifacts, tiles_from_mask, tissue_mask  # noqa: E402

METHODS = ("saturation", "gray", "robust")
MPP = 8.0


def _at(mask: np.ndarray, shape) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.BOX)) >= 128


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def messy_rows(seeds: int, root: Path) -> dict[str, dict[str, list[float]]]:
    out = {m: {"dice": [], "ink": [], "glass": [], "faint": [], "time": []} for m in METHODS}
    for seed in range(seeds):
        m = messy_slide(np.random.default_rng(seed))
        path = write_pyramid_tiff(root / f"m{seed}.tif", m.rgb, mpp=MPP)
        for method in METHODS:
            cfg = TilingConfig(patch_size=32, mpp=MPP, mask=method)
            with Slide(path) as s:
                t0 = time.perf_counter()
                mask, _, _, exclude = mask_and_artifacts(s, cfg)
                tiles = tiles_from_mask(s, cfg, mask, exclude)
                out[method]["time"].append(time.perf_counter() - t0)
            truth, faint = _at(m.tissue, mask.shape), _at(m.faint, mask.shape)
            r = out[method]
            r["dice"].append(_dice(mask, truth))
            r["faint"].append(float((mask & faint).sum() / max(1, faint.sum())))
            s0 = tiles.size0
            r["ink"].append(max(m.ink[y:y + s0, x:x + s0].mean() for x, y in tiles.coords))
            r["glass"].append(min(m.tissue[y:y + s0, x:x + s0].mean() for x, y in tiles.coords))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = messy_rows(args.seeds, Path(tmp))
    rng = np.random.default_rng(0)
    views = [ihc_view(rng, h, d) for h in (0.15, 0.3, 1.0, 2.0) for d in (0.0, 0.8)]
    ihc = {m: min(_dice(tissue_mask(v, m, 16, 64), t) for v, t in views) for m in METHODS}
    best = min(res["robust"]["dice"])
    base = float(np.mean(res["saturation"]["time"]))
    rows = []
    for m in METHODS:
        r = res[m]
        rows += [(f"dice {m}", best / min(r["dice"]), f"{min(r['dice']):.3f}-{max(r['dice']):.3f}"),
                 (f"ink tile {m}", max(r["ink"]), f"largest ink share of a kept tile {max(r['ink']):.1%}"),
                 (f"glass tile {m}", min(r["glass"]), f"least truth tissue in a kept tile {min(r['glass']):.0%}"),
                 (f"faint kept {m}", min(r["faint"]), f"{min(r['faint']):.0%} of the faint part"),
                 (f"ihc dice {m}", ihc[m], f"lowest over {len(views)} haematoxylin/DAB views"),
                 (f"time {m}", float(np.mean(r["time"])) / base, f"{np.mean(r['time']):.2f} s per slide")]
    print_table(rows)


if __name__ == "__main__":
    main()
