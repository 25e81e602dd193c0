"""Viewer benchmark (issue 29): first paint of a 40,000-tile slide in headless Chromium.

    python benchmarks/bench_viewer.py               # 200 x 200 tiles of 64 level-0 px (12,800² px)
    python benchmarks/bench_viewer.py --grid 100    # a smaller slide

A generated pyramidal TIFF, a store holding its grid of tiles with random 16-d features, and a
2-fold attention run trained on a small store of the same features; then `featstore view`'s app
on 127.0.0.1 and Debian's headless Chromium (selenium). Rows, measured in this run:
- first paint      : from navigation to every visible deep-zoom tile and the attention overlay
                     drawn (OpenSeadragon's fully-loaded on both images), seconds; ratio = the 2 s goal ÷ it
- overlay cold     : the attention of every tile (all fold heads) painted to the overlay PNG, first request
- deep-zoom tile   : median of 50 tile requests at the deepest level, ms
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402
from featstore.store import FeatureKey, open_store, open_store_writer  # noqa: E402
from featstore.synth import write_pyramid_tiff  # noqa: E402

KEY = FeatureKey("resnet18", "random", 1)
SIZE0 = 64


def make_slide(path: Path, grid: int) -> Path:
    """A grid x grid tile slide of tissue-like colours (cheap to generate at 12,800² px)."""
    side = grid * SIZE0
    rng = np.random.default_rng(0)
    small = rng.integers(150, 230, (grid, grid, 3), dtype=np.uint8)
    small[..., 1] = (small[..., 1] * 0.6).astype(np.uint8)
    rgb = np.repeat(np.repeat(small, SIZE0, 0), SIZE0, 1)
    rgb[::16, :, :] = 90    # some texture so JPEG tiles are not trivial
    assert rgb.shape[:2] == (side, side)
    return write_pyramid_tiff(path, rgb, mpp=0.5)


def write_store(path: Path, slides: dict[str, tuple[np.ndarray, np.ndarray, str]]) -> str:
    st = open_store_writer(path)
    st.set_tiling({"patch_size": 32, "mpp": 1.0, "overlap": 0, "min_tissue": 0.5, "mask": "saturation"})
    for sid, (coords, feats, source) in slides.items():
        st.write_tiling(sid, coords, np.ones(len(coords), np.float32), {"source": source, "size0": SIZE0,
                                                                         "slide_mpp": 0.5})
        st.write_features(sid, KEY, feats.astype(np.float16), {"encoder": KEY.encoder, "weights": KEY.weights,
                                                               "minus": KEY.minus, "dim": 16, "weights_sha256": None})
    return str(path)


def train_small_run(root: Path) -> Path:
    """A 2-fold abmil run on 16 small bags (the same key and dim as the big slide's features)."""
    import csv

    from typer.testing import CliRunner

    from featstore.cli import mil_app

    rng = np.random.default_rng(1)
    bags = {}
    for i in range(16):
        x = rng.standard_normal((40, 16)).astype(np.float32)
        x[:4, 0] += 5.0 * (i % 2)
        coords = np.stack([np.arange(40) % 8, np.arange(40) // 8], 1) * SIZE0
        bags[f"t{i}"] = (coords, x, f"t{i}.tif")
    store = write_store(root / "train.zarr", bags)
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label"])
        w.writerows([s, "ab"[i % 2]] for i, s in enumerate(bags))
    res = CliRunner().invoke(mil_app, ["train", "--store", store, "--labels", str(root / "labels.csv"), "--encoder",
                                       KEY.encoder, "--minus", "1", "--folds", "2", "--epochs", "2", "--out",
                                       str(root / "run")])
    if res.exit_code != 0:
        raise SystemExit(res.output)
    return root / "run"


def first_paint(url: str) -> float:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        t0 = time.perf_counter()
        driver.get(url)
        while not driver.execute_script("return window.fsReady === true && viewer.world.getItemCount() === 2"):
            if time.perf_counter() - t0 > 120:
                raise SystemExit("the page did not finish drawing in 120 s")
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        at = driver.execute_script("return window.fsReadyAt") / 1000.0
        slow = driver.execute_script("return performance.getEntriesByType('resource').map(e => [e.name.split('/')"
                                     ".slice(-3).join('/'), e.startTime, e.duration]).sort((a, b) => b[2] - a[2])"
                                     ".slice(0, 5)")
        n = driver.execute_script("return performance.getEntriesByType('resource').length")

        print(f"page: fully drawn {at:.2f} s after navigation ({wall:.2f} s as the driver saw it); {n} requests; "
              "slowest: " + ", ".join(f"{name} at {s0 / 1000:.2f}+{d / 1000:.2f} s" for name, s0, d in slow))
        return at
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, default=200, help="tiles per side (200: 40,000 tiles)")
    args = ap.parse_args()
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        raise SystemExit("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    import logging

    from werkzeug.serving import make_server

    from mil.run import load_run
    from mil.viewer.app import create_app
    from mil.viewer.data import ViewerData

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        slide = make_slide(root / "big.tif", args.grid)
        g = np.arange(args.grid)
        coords = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2) * SIZE0
        feats = np.random.default_rng(2).standard_normal((len(coords), 16)).astype(np.float32)
        store = write_store(root / "big.zarr", {"big": (coords, feats, str(slide))})
        run = train_small_run(root)
        print(f"setup: {len(coords)} tiles on a {args.grid * SIZE0}² px slide in {time.perf_counter() - t:.0f} s")
        data = ViewerData(open_store(store), load_run(run), (root,))
        app = create_app(data)
        client = app.test_client()
        t = time.perf_counter()
        assert client.get("/overlay/big.png").status_code == 200
        overlay_s = time.perf_counter() - t
        deepest = data.zoom("big").level_count - 1
        cols, rows = data.zoom("big").level_tiles[deepest]
        times = []
        for i in range(50):
            t = time.perf_counter()
            assert client.get(f"/dzi/big_files/{deepest}/{i % cols}_{(i // cols) % rows}.jpeg").status_code == 200
            times.append(time.perf_counter() - t)
        data._scores.clear()   # the browser's first paint pays for the attention again
        data._zoom.clear()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no line per request
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            paint = first_paint(f"http://127.0.0.1:{server.server_port}/slide/big")
        finally:
            server.shutdown()
    print_table([
        ("first paint (s)", 2.0 / paint, f"{paint:.2f} s for {len(coords)} tiles; ratio = 2 s goal / measured"),
        ("overlay cold (s)", 2.0 / overlay_s, f"{overlay_s:.2f} s: attention of {len(coords)} tiles x 2 folds + PNG"),
        ("deep-zoom tile (ms)", 1.0, f"median {np.median(times) * 1000:.1f} ms over 50 level-{deepest} tiles"),
    ])


if __name__ == "__main__":
    main()
