"""The installed distribution exposes three import names: featstore, mil and analysis.

A wheel is built from a copy of the source tree (``pip wheel --no-deps --no-build-isolation``,
so no index is reached) and its top-level names are read off the archive: a new top-level
package (``core``, ``cli``, ``study`` ...) or a stray module would collide with other installed
distributions and fails here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"featstore", "mil", "analysis"}


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "*.zarr")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("featstore", "mil", "analysis", "tests", "benchmarks", "docs"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("featstore-*.whl")
    return wheel


def test_the_wheel_installs_only_featstore_mil_and_analysis(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    top = {t[:-3] if t.endswith(".py") else t for t in top}
    assert top == NAMES, f"top-level import names in the wheel: {sorted(top)}"
    # the moved floors ship inside the three names; tests, benchmarks and docs do not ship at all
    for module in ("featstore/core/errors.py", "featstore/cli.py", "featstore/read/slide.py",
                   "featstore/stain/__init__.py", "mil/patches/__init__.py", "mil/seg/__init__.py",
                   "mil/study/__init__.py", "analysis/records.py"):
        assert module in names, f"{module} is missing from the wheel"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]
    assert "featstore = featstore.cli:featstore_app" in entry_points
    assert "mil = featstore.cli:mil_app" in entry_points
