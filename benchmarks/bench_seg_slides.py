"""Whole-slide segmentation benchmark (issue 29): `mil seg predict-slides` against its model alone.

    python benchmarks/bench_seg_slides.py                  # a 32 x 32 gland-image slide (3072² px at 0.5 µm/px)
    python benchmarks/bench_seg_slides.py --device cuda    # AMP + channels_last on a GPU
    python benchmarks/bench_seg_slides.py --grid 16 --window 128

A generated gland slide and a resnet18 U-Net (random weights: speed does not depend on training)
segmenting it at 1 µm/px. Rows, measured in this run:
- model only   : windows/s of the forward passes on windows already in memory (the ceiling)
- one slide    : windows/s of segment_slide (tissue mask, reads in 2 threads, forward, paste);
                 ratio = it / model only
- whole command: windows/s of predict_slides (also the PNG, seg.json, GeoJSON); ratio = it / model only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402
from featstore.core.runtime import resolve_device  # noqa: E402
from featstore.read.slide import Slide  # noqa: E402
from featstore.synth import write_gland_slides  # noqa: E402
from mil.seg.model import build_segmenter  # noqa: E402
from mil.seg.predict import load_run  # noqa: E402
from mil.seg.slides import Geometry, SlidePredictConfig, predict_batch, predict_slides, segment_slide  # noqa: E402


def make_run(root: Path) -> Path:
    """A `mil seg train`-shaped run folder holding an untrained resnet18 U-Net of 3 classes at 1 µm/px."""
    run = root / "run"
    run.mkdir()
    model, _ = build_segmenter("unet", "resnet18", "random", classes=3)
    torch.save(model.state_dict(), run / "model.pt")
    (run / "config.json").write_text(json.dumps({"kind": "segmentation", "arch": "unet", "encoder": "resnet18",
                                                 "classes": 3, "mask_kind": "multiclass", "mpp": 1.0}))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, default=32, help="gland images per side (96 px each at 0.5 µm/px)")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slides, _ = write_gland_slides(root / "cohort", 1, grid=args.grid)
        path = slides / "case0.tiff"
        run = make_run(root)
        model, _, pre = load_run(run)
        device = resolve_device(args.device)
        model = model.to(device)
        cfg = SlidePredictConfig(window=args.window, margin=args.margin, batch_size=args.batch_size,
                                 device=args.device, geojson=True)
        side = args.window + 2 * args.margin
        with Slide(path) as s:
            g = Geometry.of(s.dimensions, s.mpp, 1.0, cfg)
            windows = [s.read_patch((int(x) - g.margin0, int(y) - g.margin0), g.size0 + 2 * g.margin0, side)
                       for x, y in g.origins(s.dimensions)]
        predict_batch(model, windows[:args.batch_size], pre, device)            # warm-up
        t = time.perf_counter()
        for b in range(0, len(windows), args.batch_size):
            predict_batch(model, windows[b:b + args.batch_size], pre, device)
        model_rate = len(windows) / (time.perf_counter() - t)
        t = time.perf_counter()
        _, rec = segment_slide(model, pre, path, 1.0, cfg, device)
        slide_rate = rec["segmented"] / (time.perf_counter() - t)
        t = time.perf_counter()
        report = predict_slides(run, [path], root / "maps", cfg)
        assert report.done == ["case0"], report
        command_rate = rec["segmented"] / (time.perf_counter() - t)
    print(f"slide {rec['size0'][0]}² px at 0.5 µm/px; {rec['windows']} windows of {args.window} px (+{args.margin} "
          f"context) at 1 µm/px, {rec['segmented']} on tissue; device {device}, {torch.get_num_threads()} threads")
    print_table([
        ("model only (windows/s)", 1.0, f"{model_rate:.2f} windows/s, windows in memory"),
        ("one slide (windows/s)", slide_rate / model_rate, f"{slide_rate:.2f} windows/s: mask, reads, forward, paste"),
        ("whole command (windows/s)", command_rate / model_rate,
         f"{command_rate:.2f} windows/s: also the model load, PNG, seg.json and GeoJSON"),
    ])


if __name__ == "__main__":
    main()
