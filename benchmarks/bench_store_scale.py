"""Store metadata at cohort scale: open + list, one read, as_dask, `featstore ls`, a MIL epoch.

Builds stores of N tiny slides (8 tiles x 16 dims; ``--levels L`` feature sets per slide with a
real extraction's provenance) and times what every reader of a big cohort pays before any
compute: the unconsolidated open + list (walking every node, up to ``--walk-max``), the
consolidation ``featstore extract`` ends with, then on the consolidated store ``open_store`` +
``slide_ids()`` + ``encoders()``, the metadata of one read (``provenance()``), ``features()``,
``as_dask`` over all slides (build and compute), the ``featstore ls`` CLI (a subprocess,
interpreter start-up reported apart), a MIL epoch's store overhead (``mil.data.load_bags``, then
one pass reading every bag, no model), and open + list after 100 slides were written since the
consolidation (their change markers read).

Building: one template slide is written through the public writer; its files are then copied
under every other slide id, the same layout byte for byte (``--public-writer`` writes every
slide through the writer instead: ~30 ms a slide). With ``--s3`` stores of ``--s3-sizes`` are
uploaded whole to a local moto S3 server (its own process) and measured there; for
``--s3-listing`` sizes only what opening and listing read (root, ``slides/zarr.json``,
``failures/``) and 200 slides go up (a 30k-slide upload to moto takes about an hour).

    python benchmarks/bench_store_scale.py                          # 1000,3000 local (~1 min)
    python benchmarks/bench_store_scale.py --sizes 1000,10000,30000 --s3 --s3-sizes 1000 --s3-listing 10000,30000
    python benchmarks/bench_store_scale.py --sizes 1000,10000,30000 --levels 4 --no-ls
    python benchmarks/bench_store_scale.py --profile 10000          # cProfile open+list at 10k
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import featstore  # noqa: E402
from featstore.store import FeatureKey  # noqa: E402

TILES, DIM = 8, 16
KEY = FeatureKey("resnet18", "random-s0", 0)
KEYS = [KEY]  # --levels L: resnet18 minus 0..L-1, each with a real extraction's provenance
#: The provenance a real `featstore extract` records on each array (about 1.4 KB of JSON).
PROV = {"encoder": "resnet18", "timm_model": "resnet18", "weights": "random-s0", "weights_kind": "random",
        "weights_sha256": None, "weights_path": None, "seed": 0, "levels": [0, 1, 2, 3],
        "dims": {"0": 512, "1": 256, "2": 128, "3": 64}, "taps": {"0": "layer4", "1": "layer3", "2": "layer2",
        "3": "layer1"}, "pooling": "global average (float32)",
        "preprocessing": {"input_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "interpolation": "bilinear", "resize": "Slide.read_patch: best pyramid level"},
        "timm_version": "1.0.31", "torch_version": "2.14.1", "dim": DIM, "precision": "bf16",
        "reader": "native", "stain": {"method": "none"},
        "tiling": {"patch_size": 256, "mpp": 0.5, "overlap": 0, "min_tissue": 0.5, "mask": "saturation",
                   "thumb_mpp": 8.0},
        "slide": {"source": "/data/tcga/TCGA-XX-0000-01Z-00-DX1.svs",
                  "fingerprint": {"size": 912345678, "partial_sha256": "b" * 64}, "slide_mpp": 0.2520,
                  "size0": 508}, "featstore_version": "0.1.0", "created": "2026-12-04T20:10:10+00:00"}
TILING = {"patch_size": 32, "mpp": 1.0}
#: Goals of issue 19: seconds for open + list at 30k slides; ms per read of metadata overhead.
GOAL_OPEN_LOCAL, GOAL_OPEN_S3, GOAL_READ_MS = 2.0, 10.0, 1.0
BUCKET = "bench"


# ------------------------------------------------------------------------------------ building
def _template(root: Path) -> tuple[Path, list[tuple[str, bytes]]]:
    """A 1-slide store written by the public writer; its slide's files as (relative path, bytes)."""
    path = root / "template.zarr"
    st = featstore.open_store(path, mode="a")
    st.set_tiling(TILING)
    rng = np.random.default_rng(0)
    coords = np.stack([np.arange(TILES) * 32, np.zeros(TILES)], 1)
    st.write_tiling("t", coords, np.ones(TILES), {"source": "synthetic", "slide_mpp": 1.0, "size0": 32})
    for k in KEYS:
        st.write_features("t", k, rng.standard_normal((TILES, DIM)), {**PROV, "minus": k.minus})
    sdir = path / "slides" / "t"
    files = [(str(p.relative_to(sdir)), p.read_bytes()) for p in sorted(sdir.rglob("*")) if p.is_file()]
    return path, files


def write_slide(st, sid: str) -> None:
    """One slide through the public writer: its tiling, then every feature set of KEYS."""
    coords = np.stack([np.arange(TILES) * 32, np.zeros(TILES)], 1)
    st.write_tiling(sid, coords, np.ones(TILES), {"source": "synthetic", "slide_mpp": 1.0, "size0": 32})
    for k in KEYS:
        st.write_features(sid, k, np.zeros((TILES, DIM)), {**PROV, "minus": k.minus})


def build_local(n: int, root: Path, public_writer: bool = False) -> tuple[Path, float]:
    """A store of *n* slides at root/s<n>.zarr; returns (path, build seconds)."""
    t0 = time.perf_counter()
    tpl, files = _template(root)
    path = root / f"s{n}.zarr"
    if public_writer:
        st = featstore.open_store(path, mode="a")
        st.set_tiling(TILING)
        for i in range(n):
            write_slide(st, f"slide_{i:06d}")
    else:
        shutil.copytree(tpl, path, ignore=shutil.ignore_patterns("t", ".changes"))
        dirs = sorted({str(Path(rel).parent) for rel, _ in files})
        for i in range(n):
            sdir = path / "slides" / f"slide_{i:06d}"
            for d in dirs:
                (sdir / d).mkdir(parents=True, exist_ok=True)
            for rel, data in files:
                (sdir / rel).write_bytes(data)
    shutil.rmtree(tpl)
    return path, time.perf_counter() - t0


# ------------------------------------------------------------------------------------ S3
class MotoS3:
    """A moto S3 server in its own process (so its work does not share our GIL)."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(self.env)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        self.fs().makedirs(BUCKET, exist_ok=True)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=self.endpoint, key="testing",
                                 secret="testing")

    def upload(self, local: Path) -> tuple[str, float]:
        t0 = time.perf_counter()
        url = f"s3://{BUCKET}/{local.name}"
        self.fs().put(str(local), f"{BUCKET}/{local.name}", recursive=True)
        return url, time.perf_counter() - t0

    def upload_listing(self, local: Path, n_slides: int = 200) -> tuple[str, float]:
        """Upload what opening and listing read (the root, the consolidated slides/zarr.json,
        failures/) plus the first *n_slides* slides whole: a 30k-slide upload to moto takes an hour."""
        t0 = time.perf_counter()
        fs = self.fs()
        dest = f"{BUCKET}/listing-{local.name}"
        for rel in ("zarr.json", "slides/zarr.json", "failures/zarr.json"):
            fs.put(str(local / rel), f"{dest}/{rel}")
        for sdir in sorted((local / "slides").iterdir())[:n_slides]:
            if sdir.is_dir():
                fs.put(str(sdir), f"{dest}/slides/{sdir.name}", recursive=True)
        return f"s3://{dest}", time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------ measures
def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _open_list(path: str):
    st = featstore.open_store(path)
    ids = st.slide_ids()
    keys = st.encoders()
    return st, ids, keys


def _cli_ls(path: str, env: dict | None) -> float:
    cmd = [sys.executable, "-c", "from featstore.cli import featstore_app; featstore_app()", "ls", path]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {}), "COLUMNS": "200"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"featstore ls failed: {res.stderr[-2000:]}")
    return dt


def _cli_startup() -> float:
    cmd = [sys.executable, "-c", "import featstore.cli, featstore.store, featstore.commands.store"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(path: str, n: int, *, ls: bool, env: dict | None = None) -> list[tuple[str, float, int]]:
    """(operation, seconds, count of per-slide units) for one store."""
    from mil.data import load_bags

    rows: list[tuple[str, float, int]] = []
    dt, (st, ids, keys) = _timed(lambda: _open_list(path))
    assert len(ids) == n and keys == KEYS, (len(ids), keys)
    rows.append(("open+slide_ids+encoders", dt, n))
    st2 = featstore.open_store(path)
    dt, _ = _timed(st2.slide_ids)
    rows.append(("  slide_ids (alone)", dt, n))
    dt, _ = _timed(st2.encoders)
    rows.append(("  encoders (alone)", dt, n))
    st.resolve_key(KEY.encoder, KEY.minus)  # first call lists encoders; a user's session pays it once
    sid = ids[len(ids) // 2]
    dt, x = _timed(lambda: st.features(sid, KEY.encoder, KEY.minus))
    assert x.shape == (TILES, DIM)
    rows.append(("features() first read", dt, 1))
    reps = min(200, n)
    dt, _ = _timed(lambda: [st.provenance(s, KEY.encoder, KEY.minus) for s in ids[:reps]])
    rows.append((f"metadata only x{reps} (provenance)", dt, reps))
    reps = min(200, n)
    dt, _ = _timed(lambda: [st.features(s, KEY.encoder, KEY.minus) for s in ids[:reps]])
    rows.append((f"features() x{reps} (warm)", dt, reps))
    dt, (arr, offsets) = _timed(lambda: st.as_dask(KEY.encoder, KEY.minus))
    assert arr.shape == (n * TILES, DIM) and len(offsets) == n
    rows.append(("as_dask build", dt, n))
    dt, total = _timed(lambda: arr.sum(dtype="float64").compute())
    rows.append(("as_dask compute (sum)", dt, n))
    if ls:
        rows.append(("featstore ls (subprocess)", _cli_ls(path, env), n))
    key = st.resolve_key(KEY.encoder, KEY.minus)
    dt, bags = _timed(lambda: load_bags(st, ids, key, cache="none"))
    rows.append(("mil load_bags (check)", dt, n))
    dt, cnt = _timed(lambda: sum(1 for _ in bags.iterate(ids)))
    assert cnt == n
    rows.append(("mil epoch: read every bag", dt, n))
    return rows


def measure_listing(url: str, n: int, reps: int = 200) -> list[tuple[str, float, int]]:
    """Open + list a listing-only upload (see MotoS3.upload_listing), and read its first slides."""
    rows: list[tuple[str, float, int]] = []
    dt, (st, ids, keys) = _timed(lambda: _open_list(url))
    assert len(ids) == n and keys == KEYS, (len(ids), keys)
    rows.append(("open+slide_ids+encoders", dt, n))
    st2 = featstore.open_store(url)
    rows.append(("  slide_ids (alone)", _timed(st2.slide_ids)[0], n))
    rows.append(("  encoders (alone)", _timed(st2.encoders)[0], n))
    st.resolve_key(KEY.encoder, KEY.minus)
    dt, _ = _timed(lambda: [st.provenance(s, KEY.encoder, KEY.minus) for s in ids[:reps]])
    rows.append((f"metadata only x{reps} (provenance)", dt, reps))
    dt, _ = _timed(lambda: [st.features(s, KEY.encoder, KEY.minus) for s in ids[:reps]])
    rows.append((f"features() x{reps} (warm)", dt, reps))
    return rows


def stale_open(path: str, n: int, changed: int = 100) -> float:
    """Write *changed* new slides after the consolidation, then time open + list (markers read)."""
    st = featstore.open_store(path, mode="a")
    for i in range(changed):
        write_slide(st, f"new_{i:05d}")
    dt, (_, ids, _) = _timed(lambda: _open_list(path))
    assert len(ids) == n + changed, (len(ids), n + changed)
    featstore.open_store(path, mode="a").consolidate()  # back to a clean snapshot for the next measures
    return dt


def profile_open(path: str, top: int = 25) -> str:
    pr = cProfile.Profile()
    pr.enable()
    _open_list(path)
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("cumulative").print_stats(top)
    out.write("\n--- by total (own) time ---\n")
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def count_fs_calls(path: str) -> dict[str, int]:
    """How many store-level reads / listings open+list makes (zarr Store methods, counted)."""
    from zarr.storage import LocalStore

    counts: dict[str, int] = {}
    orig = {}
    for name in ("get", "list_dir", "exists", "list_prefix", "get_partial_values"):
        if hasattr(LocalStore, name):
            orig[name] = getattr(LocalStore, name)

            def wrap(fn, name=name):
                if hasattr(fn, "__aiter__") or name.startswith("list"):
                    def gen(self, *a, **k):
                        counts[name] = counts.get(name, 0) + 1
                        return fn(self, *a, **k)
                    return gen

                async def co(self, *a, **k):
                    counts[name] = counts.get(name, 0) + 1
                    return await fn(self, *a, **k)
                return co
            setattr(LocalStore, name, wrap(orig[name]))
    try:
        _open_list(path)
    finally:
        for name, fn in orig.items():
            setattr(LocalStore, name, fn)
    return counts


# ------------------------------------------------------------------------------------ report
def print_results(results: dict[tuple[str, int], list[tuple[str, float, int]]]) -> None:
    print(f"\n{'backend':7} {'slides':>6}  {'operation':28} {'seconds':>9} {'ms/slide':>9} {'x vs 1st':>8}  goal")
    base: dict[tuple[str, str], tuple[int, float]] = {}
    for (backend, n), rows in results.items():
        for op, sec, units in rows:
            per = sec / max(units, 1) * 1000
            b = base.setdefault((backend, op), (n, sec))
            # linearity: time ratio divided by size ratio (1.0 = linear, >1 = worse than linear)
            ratio = (sec / b[1]) if b[1] > 0 else float("nan")
            lin = ratio / (n / b[0]) if units != 1 and not op.startswith(("features() x", "metadata only")) else ratio
            goal = ""
            if op == "open+slide_ids+encoders":
                g = GOAL_OPEN_LOCAL if backend == "local" else GOAL_OPEN_S3
                est30k = sec * 30000 / n
                goal = (f"< {g:.0f} s at 30k: {'OK' if sec < g else 'MISS'}" if n == 30000 else
                        f"< {g:.0f} s at 30k (linear est. {est30k:.1f} s: {'OK' if est30k < g else 'MISS'})")
            elif op.startswith("metadata only") and backend == "local":
                goal = f"<= {GOAL_READ_MS:.0f} ms/read: {'OK' if per <= GOAL_READ_MS else 'MISS'}"
            print(f"{backend:7} {n:6d}  {op:28} {sec:9.3f} {per:9.3f} {lin:8.2f}  {goal}")
    print("(x vs 1st: time ratio / size ratio against the smallest size of that backend; 1.00 = linear)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,3000", help="slide counts of the local stores")
    ap.add_argument("--s3", action="store_true", help="also measure on a local moto S3 server")
    ap.add_argument("--s3-sizes", default="1000", help="slide counts uploaded to S3 (each must be in --sizes)")
    ap.add_argument("--s3-listing", default="", help="sizes whose listing (not every slide) goes to S3: "
                    "open + list measured at scale without an hour of uploads")
    ap.add_argument("--no-ls", action="store_true", help="skip the `featstore ls` subprocess")
    ap.add_argument("--ls-max", type=int, default=3000, help="run `featstore ls` locally only up to this size")
    ap.add_argument("--s3-ls-max", type=int, default=300, help="run `featstore ls` on S3 only up to this size")
    ap.add_argument("--levels", type=int, default=1, help="feature sets per slide (minus 0..L-1), real provenance")
    ap.add_argument("--walk-max", type=int, default=3000, help="time the unconsolidated open up to this size")
    ap.add_argument("--public-writer", action="store_true", help="build every slide through StoreWriter (slow)")
    ap.add_argument("--profile", type=int, default=0, help="cProfile open+list at this size (local) and exit")
    ap.add_argument("--keep", default=None, help="build stores in this directory and keep them")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    KEYS[:] = [FeatureKey("resnet18", "random-s0", m) for m in range(args.levels)]
    print(f"{len(KEYS)} feature set(s) per slide, {TILES} tiles x {DIM} dims each")
    s3_sizes = [int(s) for s in args.s3_sizes.split(",") if s] if args.s3 else []
    s3_listing = [int(s) for s in args.s3_listing.split(",") if s] if args.s3 else []
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_store_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.profile:
            path = root / f"s{args.profile}.zarr"
            if not path.exists():
                path, sec = build_local(args.profile, root, args.public_writer)
                print(f"built {args.profile} slides in {sec:.1f} s")
            print("store calls during open+list:", count_fs_calls(str(path)))
            print(profile_open(str(path)))
            return
        print(f"featstore ls: interpreter + imports alone {_cli_startup():.2f} s (included in its row)")
        results: dict[tuple[str, int], list] = {}
        s3 = MotoS3() if (s3_sizes or s3_listing) else None
        try:
            for n in sizes:
                path = root / f"s{n}.zarr"
                if path.exists() and args.keep:
                    sec = 0.0
                else:
                    path, sec = build_local(n, root, args.public_writer)
                print(f"[{n}] built locally in {sec:.1f} s ({sec / n * 1000:.2f} ms/slide"
                      f"{', public writer' if args.public_writer else ', template copy'})", flush=True)
                pre = []
                if n <= args.walk_max:  # what every open cost before consolidation
                    pre.append(("open+list, not consolidated", _timed(lambda: _open_list(str(path)))[0], n))
                dt, _ = _timed(lambda: featstore.open_store(path, mode="a").consolidate())
                pre.append(("consolidate (zarr)", dt, n))
                results[("local", n)] = pre + measure(str(path), n, ls=not args.no_ls and n <= args.ls_max)
                if s3 is not None and n in s3_sizes:
                    url, up = s3.upload(path)
                    print(f"[{n}] uploaded to {url} in {up:.1f} s", flush=True)
                    results[("s3", n)] = measure(url, n, ls=not args.no_ls and n <= args.s3_ls_max, env=s3.env)
                    results[("s3", n)].append(("open+list, 100 changed since", stale_open(url, n), n))
                elif s3 is not None and n in s3_listing:
                    url, up = s3.upload_listing(path)
                    print(f"[{n}] listing + 200 slides uploaded to {url} in {up:.1f} s", flush=True)
                    results[("s3", n)] = measure_listing(url, n)
                results[("local", n)].append(("open+list, 100 changed since", stale_open(str(path), n), n))
                print_results({k: v for k, v in results.items() if k[1] == n})
        finally:
            if s3 is not None:
                s3.stop()
        results = dict(sorted(results.items(), key=lambda kv: (kv[0][0] != "local", kv[0][0], kv[0][1])))
        print("\n=== all sizes ===")
        print_results(results)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
