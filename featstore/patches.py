"""Patches of many slides read by many threads, as normalised tensors (extractor, fine-tuner)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from featstore.slide import Slide


class PatchReader:
    """Thread-safe patch reading: each thread keeps its own OpenSlide handles.

    A thread keeps the two slides it read last open (the current and the next slide), so a
    reopen after a sticky OpenSlide error never races another thread's read. Batches are
    normalised as the encoder expects: ``(rgb - 255 * mean) / (255 * std)``, NCHW float32.
    """

    def __init__(self, out_size: int, mean, std, pin: bool = False):
        self.out_size = int(out_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.pin = pin
        self._local = threading.local()
        self._opened: list[Slide] = []
        self._lock = threading.Lock()

    def slide(self, path: Path, mpp: float | None = None) -> Slide:
        """This thread's handle on *path* (opened on first use)."""
        cache = getattr(self._local, "slides", None)
        if cache is None:
            cache = self._local.slides = {}
        if path not in cache:
            while len(cache) >= 2:
                _, old = cache.popitem()
                with self._lock:
                    self._opened.remove(old)
                old.close()
            slide = Slide(path, mpp=mpp)
            cache[path] = slide
            with self._lock:
                self._opened.append(slide)
        return cache[path]

    def read_into(self, out: np.ndarray, path: Path, coords: np.ndarray, size0: int,
                  mpp: float | None = None) -> None:
        """Fill ``out`` (len(coords), S, S, 3) uint8 with the patches at level-0 *coords*."""
        slide = self.slide(path, mpp)
        for i, (x, y) in enumerate(coords):
            out[i] = slide.read_patch((int(x), int(y)), size0, self.out_size)

    def read(self, path: Path, coords: np.ndarray, size0: int, mpp: float | None = None) -> np.ndarray:
        out = np.empty((len(coords), self.out_size, self.out_size, 3), dtype=np.uint8)
        self.read_into(out, path, coords, size0, mpp)
        return out

    def normalise(self, rgb: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> normalised (B, 3, S, S) float32 (pinned when feeding CUDA)."""
        t = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
        t = t.sub_(self.mean).div_(self.std).contiguous()
        return t.pin_memory() if self.pin else t

    def close(self) -> None:
        """Close every handle any thread opened."""
        with self._lock:
            for s in self._opened:
                s.close()
            self._opened.clear()
