"""Suite-wide settings for pytest-xdist workers: an equal share of the cores each, and no
inherited terminal width.

Two workers on a 2-core machine that each let torch (and any child process, through
OMP_NUM_THREADS) use every core oversubscribe the CPU and run slower than one process; each
worker therefore uses cores // workers threads. Tests that pin their own thread count (the
MIL trainer, the subprocess fault tests) keep it.
"""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # xdist hands its workers the terminal's COLUMNS; rich would freeze every console at that
        # width when featstore.core.ui is imported, so output in a test would wrap as on that
        # terminal instead of as in a pipe (what a serial run and the tests' own COLUMNS expect)
        for var in ("COLUMNS", "LINES"):
            os.environ.pop(var, None)
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, threads)
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
