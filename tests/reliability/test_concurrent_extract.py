"""Load: 4 concurrent `featstore extract` processes on one local store, 40 tiny slides.

Every slide must be extracted exactly once (the per-slide lock files), the store must be valid
afterwards, and no lock may be left behind. Each child is the real CLI (``cli.featstore_app``);
it also dumps its ExtractReport (done / skipped / busy / failed) as JSON so the test knows which
process did which slide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import featstore
from featstore.synth import rectangles_slide, write_pyramid_tiff
from featstore.tiling import TilingConfig

REPO = Path(__file__).parents[2]
N_SLIDES, N_PROCS = 40, 4
ARGS = ["--encoder", "resnet18", "--minus", "0,1", "--weights", "random", "--resize", "32", "--precision", "fp32",
        "--batch-size", "32", "--workers", "1", "--patch-size", "32", "--mpp", "1.0"]
#: The child: the real CLI, plus its report written to $REPORT_OUT (the CLI prints only counts).
CHILD = """
import json, os
import featstore.commands.extract as E
_print = E.print_report
def _dump(report, store):
    _print(report, store)
    with open(os.environ["REPORT_OUT"], "w") as fh:
        json.dump({"pid": os.getpid(), "done": report.done, "skipped": report.skipped, "busy": report.busy,
                   "failed": report.failed, "tiles": report.tiles, "seconds": report.seconds}, fh)
E.print_report = _dump
from featstore.cli import featstore_app
featstore_app()
"""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort40")
    for i in range(N_SLIDES):
        rects = [(0, 0, 256, 128), (0, 128, 128, 256)] if i % 2 else [(32, 32, 256, 256)]
        write_pyramid_tiff(d / f"s{i:02d}.tif", rectangles_slide((256, 256), rects, seed=i), mpp=0.5)
    return d


def test_four_concurrent_extractors_do_every_slide_exactly_once(cohort, tmp_path):
    store = tmp_path / "shared.zarr"
    # the tiling is recorded once up front, as a cohort's first run would (see the report on item 4)
    featstore.open_store(store, mode="a").set_tiling(TilingConfig(patch_size=32, mpp=1.0).to_dict())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    reports = [tmp_path / f"report{i}.json" for i in range(N_PROCS)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, "extract", str(cohort), "--store", str(store), *ARGS],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**env, "REPORT_OUT": str(r)}) for r in reports]
    outs = [p.communicate(timeout=240) for p in procs]
    wall = time.perf_counter() - t0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"extractor {p.pid} exited {p.returncode}\n{out}\n{err[-3000:]}"
    reps = [json.loads(r.read_text()) for r in reports]

    done = Counter(s for r in reps for s in r["done"])
    ids = [f"s{i:02d}" for i in range(N_SLIDES)]
    twice = {s: [r["pid"] for r in reps if s in r["done"]] for s, c in done.items() if c > 1}
    assert not twice, f"slides extracted by more than one process: {twice}"
    assert sorted(done) == ids, f"never done: {sorted(set(ids) - set(done))}"
    assert not any(r["failed"] for r in reps), [r["failed"] for r in reps]
    for r in reps:  # every slide is accounted for in every process: done, busy elsewhere, or already complete
        assert sorted(r["done"] + r["busy"] + r["skipped"]) == ids, r

    st = featstore.open_store(store)
    assert st.slide_ids() == ids
    tiles = 0
    for sid in ids:
        n = st.n_tiles(sid)
        assert n > 0 and st.coords(sid).shape == (n, 2)
        for minus, dim in ((0, 512), (1, 256)):
            x = st.features(sid, "resnet18", minus)
            assert x.shape == (n, dim) and np.isfinite(x.astype(np.float32)).all(), (sid, minus, x.shape)
        tiles += n
    assert tiles == sum(r["tiles"] for r in reps)
    assert not st.failures()
    assert not list((store / ".locks").glob("*.lock")), "locks left behind"
    per = ", ".join(f"pid {r['pid']}: {len(r['done'])} slides / {r['tiles']} tiles" for r in reps)
    print(f"\n{N_PROCS} extractors, {N_SLIDES} slides, {tiles} tiles in {wall:.1f} s wall: "
          f"{tiles / wall:.1f} tiles/s total ({per})")
