"""Class maps of `mil seg predict-slides` as viewer overlays (`featstore view --seg DIR`).

The folder's ``seg.json`` is read again when it changes, so slides segmented while the viewer
runs appear; a slide is listed only once its PNG is in place (the writer's order)."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np

from mil.errors import MilError
from mil.segmaps import MANIFEST, read_manifest
from mil.viewer.data import ViewerError


class SegMaps:
    """The class-map folder *folder*: its slides, classes and colours, and each map as an RGBA PNG
    (class 0 transparent)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._doc: dict = {}
        self._png: dict[str, bytes] = {}
        self.slide_ids()      # read now: a wrong folder is one line at start, not an error page later

    @property
    def doc(self) -> dict:
        """seg.json, read again when its mtime changes."""
        with self._lock:
            try:
                stamp = (self.folder / MANIFEST).stat().st_mtime_ns
            except OSError:
                stamp = None
            if stamp is None or stamp != self._stamp:
                try:
                    self._doc = read_manifest(self.folder)
                except MilError as exc:
                    raise ViewerError(f"--seg {exc}") from None
                self._stamp, self._png = stamp, {}
            return self._doc

    def slide_ids(self) -> list[str]:
        return list(self.doc.get("slides", {}))

    def record(self, sid: str) -> dict | None:
        return self.doc.get("slides", {}).get(sid)

    def classes(self) -> list[dict]:
        """[{id, name, color}] of the classes a map may show (background left out)."""
        return [c for c in self.doc.get("classes", []) if int(c["id"]) > 0]

    def legend(self) -> list[tuple[str, str]]:
        """(class name, #rrggbb) of each class."""
        return [(c["name"], "#%02x%02x%02x" % tuple(c["color"])) for c in self.classes()]

    def areas(self, sid: str) -> dict[str, str]:
        """{"<class> mm²": value} of a slide (for the list page)."""
        rec = self.record(sid) or {}
        return {f"{k} mm²": f"{v:.4g}" for k, v in (rec.get("area_mm2") or {}).items()}

    def _file(self, sid: str) -> Path:
        rec = self.record(sid)
        if rec is None:
            raise ViewerError(f"no class map of {sid!r} in {self.folder}")
        path = (self.folder / str(rec.get("png", ""))).resolve()
        if path.parent != self.folder or not path.is_file():       # seg.json names a file of the folder only
            raise ViewerError(f"class map of {sid} is not a file of {self.folder}")
        return path

    def width(self, sid: str, w0: int) -> float:
        """The map's width in viewport units (the slide's width is 1): its pixels times their level-0 size."""
        rec = self.record(sid)
        return float(rec["map"][0]) * float(rec["downsample"]) / float(w0)

    def png(self, sid: str) -> bytes:
        """The slide's class map as RGBA: each class in its colour, class 0 transparent (kept once made)."""
        from PIL import Image

        path, classes = self._file(sid), self.classes()     # before the lock: both read seg.json under it
        with self._lock:
            if sid not in self._png:
                with Image.open(path) as img:
                    ids = np.asarray(img)
                lut = np.zeros((256, 4), np.uint8)
                for c in classes:
                    lut[int(c["id"])] = [*c["color"], 255]
                buf = io.BytesIO()
                Image.fromarray(lut[ids], "RGBA").save(buf, "PNG")
                self._png[sid] = buf.getvalue()
            return self._png[sid]


__all__ = ["SegMaps"]
