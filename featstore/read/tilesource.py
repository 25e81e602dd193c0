"""TileSource: patches at a store's coords, read by a thread pool as normalised encoder input.

The one tile reader of the toolkit (extractor, fine-tuner, heatmaps, pretraining). It knows
where each slide's file is (``add``, or :meth:`TileSource.from_store` which finds the files and
checks they are the ones that were tiled), reads patches with :meth:`Slide.read_patch` resized
the way the encoder's weights expect (``preprocessing["interpolation"]``) and normalises them
as ``(rgb - 255 * mean) / (255 * std)``, NCHW float32.

Image shards (:mod:`featstore.read.images`, ``featstore extract --images``) are read the same way:
``add(..., images=rows)`` / ``from_store`` make patch ``(i, 0)`` of a shard its image ``i``.

Thread safety: each thread keeps its own OpenSlide handles, and only the two slides it read
last (the current and the next slide), so a reopen after a sticky OpenSlide error never races
another thread's read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from featstore.errors import FeatstoreError, SlideChangedError, SlideNotFoundError
from featstore.read.images import ImageRow, ImageShard, is_image_shard, shard_rows, stored_shard
from featstore.read.native import READERS, NativeSlide, TileCache, open_slide
from featstore.read.slide import Slide, resize_filter


def check_fingerprint(slide: Slide, want: Mapping | None, what: str, hint: str) -> None:
    """Raise :class:`SlideChangedError` when *slide*'s file is not the one fingerprinted as *want*.

    *what* names the stored slide (``"the store as 's1'"``), *hint* says what to do.
    """
    if want and slide.fingerprint() != dict(want):
        raise SlideChangedError(f"{slide.path} differs from the file tiled into {what} (size/hash changed); {hint}")


def _more(items: Sequence[str], n: int) -> str:
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


def find_slide_files(store, slide_ids: Sequence[str], slides: Sequence[str] | None = None) -> dict[str, Path]:
    """{slide_id: file} from *slides* (files, dirs, globs, CSV as `featstore extract` takes them)
    or else each slide's recorded source; :class:`SlideNotFoundError` names the missing ones."""
    from featstore.cohort import discover_slides

    if slides:
        try:
            found = {r.slide_id: r.path for r in discover_slides(list(slides))}
        except FeatstoreError as exc:
            raise type(exc)(f"--slides: {exc}") from None
        missing = [s for s in slide_ids if s not in found]
        if missing:
            raise SlideNotFoundError(
                f"{len(missing)} slide(s) of the store not found among --slides ({_more(missing, 10)}); pass the "
                "files, directory or slide_id,path CSV the store was extracted from")
        return {s: Path(found[s]) for s in slide_ids}
    paths, gone = {}, []
    for s in slide_ids:
        src = store.slide_info(s).get("source")
        if not src or not Path(src).is_file():
            gone.append(f"{s} ({src})")
        else:
            paths[s] = Path(src)
    if gone:
        raise SlideNotFoundError(f"slide file(s) recorded in {store.path} not found: {_more(gone, 5)}; "
                                 "pass --slides with their current location")
    return paths


class TileSource:
    """Thread-pooled patch reading at stored coords; see the module docstring.

    *preprocessing* is ``encoder.preprocessing()`` (``input_size``, ``mean``, ``std``,
    ``interpolation``, optional ``resize_size``: resize to it, then centre-crop ``input_size``). *slide_mpp* overrides the file's microns per pixel of every slide not
    given its own in :meth:`add`. *pin* pins batches for a CUDA copy. *reader* is ``auto``,
    ``native`` or ``openslide`` (:func:`featstore.read.native.open_slide`); the native reader's
    decoded tiles live in one :class:`~featstore.read.native.TileCache` of *cache_bytes* shared by
    the threads, so a tile two neighbouring patches need is decoded once. With *decode_device*
    (the extractor passes its CUDA device), batches come back as tensors on it: native slides'
    tiles are decoded there by nvJPEG (:mod:`featstore.read.devicedecode`; ``"cpu"`` runs the same code).
    *stain* (a :mod:`featstore.stain` normaliser) is applied to every uint8 batch before the
    mean/std scaling, on the batch's device (:meth:`stained`).
    """

    def __init__(self, preprocessing: Mapping, *, workers: int = 1, pin: bool = False,
                 slide_mpp: float | None = None, thread_name_prefix: str = "reader",
                 reader: str = "auto", cache_bytes: int = 256 << 20,
                 decode_device: str | torch.device | None = None, stain=None):
        self.input_size = int(preprocessing["input_size"])
        self.interpolation = str(preprocessing.get("interpolation") or "bilinear")
        self.resize_size = preprocessing.get("resize_size")    # resize, then centre-crop input_size
        resize_filter(self.interpolation)   # an unknown name fails here, not in a reader thread
        self.mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.pin = bool(pin)
        self.stain = stain if stain is not None and getattr(stain, "name", "none") != "none" else None
        self.slide_mpp = slide_mpp
        if reader not in READERS:
            raise FeatstoreError(f"--reader {reader!r}: use one of {', '.join(READERS)}")
        self.reader = reader
        self.cache = TileCache(cache_bytes)
        self.decode_device = torch.device(decode_device) if decode_device is not None else None
        self.workers = max(1, int(workers))
        self.paths: dict[str, Path] = {}
        self._readers: dict[str, str] = {}
        self._size0: dict[str, int] = {}
        self._mpp: dict[str, float | None] = {}
        self._images: dict[str, tuple[ImageRow, ...]] = {}   # image shards: their rows, in patch order
        self._local = threading.local()
        self._opened: list[Slide] = []
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=thread_name_prefix)

    @classmethod
    def from_store(cls, store, slide_ids: Sequence[str], preprocessing: Mapping, *,
                   slides: Sequence[str] | None = None, check_fingerprint: bool = True,
                   workers: int = 1, pin: bool = False, reader: str = "auto", stain=None) -> "TileSource":
        """A source over *store*'s slides: files from *slides* or each slide's recorded source.

        With *check_fingerprint*, each file must be the one that was tiled
        (:class:`SlideChangedError` otherwise). Patch size and mpp come from ``slide_info``.
        Image shards read their recorded root (or *slides*' folder / CSV folder) and images.
        *stain*: the normaliser the features were extracted with (``featstore.stain.normaliser_of``
        of their provenance), so tiles read again look as they did then.
        """
        infos = {s: store.slide_info(s) for s in slide_ids}
        shards = [s for s in slide_ids if is_image_shard(infos[s])]
        paths = find_slide_files(store, [s for s in slide_ids if s not in shards], slides)
        src = cls(preprocessing, workers=workers, pin=pin, reader=reader, stain=stain)
        for s in shards:
            src._add_shard(s, infos[s], store, slides, check_fingerprint)
        for s, p in paths.items():
            info = store.slide_info(s)
            if check_fingerprint and info.get("fingerprint"):
                _check_file(p, s, info, store)
            src.add(s, p, int(info["size0"]), info.get("slide_mpp"))
        return src

    def _add_shard(self, slide_id: str, info: Mapping, store, slides: Sequence[str] | None, check: bool) -> None:
        """Add one stored image shard (root from *slides* when given), its fingerprint checked."""
        root = _image_root(slides) if slides else Path(info["root"])
        if not root.is_dir():
            raise SlideNotFoundError(f"image folder {root} of {store.path} shard {slide_id!r} not found; "
                                     "pass --slides with its current location")
        if check and info.get("fingerprint"):
            check_fingerprint(stored_shard(info, root), info["fingerprint"], f"{store.path} as {slide_id!r}",
                              "pass the original image folder")
        self.add(slide_id, root, 0, images=shard_rows(info)[0])

    def add(self, slide_id: str, path: str | Path, size0: int, mpp: float | None = None,
            reader: str | None = None, images: Sequence[ImageRow] | None = None) -> None:
        """Make *slide_id* readable: its file, patch side in level-0 px, (optional) mpp and reader.

        With *images*, *slide_id* is an image shard: *path* is its root folder and patch
        ``(i, 0)`` is ``images[i]`` (size0, mpp and reader do not apply).
        """
        self.paths[slide_id] = Path(path)
        self._size0[slide_id] = int(size0)
        self._mpp[slide_id] = mpp if mpp is not None else self.slide_mpp
        self._readers[slide_id] = reader or self.reader
        if images is not None:
            self._images[slide_id] = tuple(images)
        else:
            self._images.pop(slide_id, None)

    def open(self, path: str | Path, mpp: float | None = None, reader: str | None = None,
             images: Sequence[ImageRow] | None = None) -> Slide | ImageShard:
        """A new handle on *path* read with this source's reader (and tile cache); caller closes it.

        With *images*, an :class:`~featstore.read.images.ImageShard` of those rows under root *path*.
        """
        if images is not None:
            return ImageShard(path, images)
        return open_slide(path, mpp, reader=reader or self.reader, cache=self.cache)

    # ------------------------------------------------------------------ reading
    def _slide(self, slide_id: str) -> Slide:
        """This thread's handle on *slide_id*'s file (opened on first use, two kept open)."""
        path = self.paths.get(slide_id)
        if path is None:
            raise FeatstoreError(f"slide {slide_id!r} is not in this TileSource; add() it (or use from_store)")
        cache = getattr(self._local, "slides", None)
        if cache is None:
            cache = self._local.slides = {}
        images = self._images.get(slide_id)
        key = path if images is None else (path, slide_id)   # shards share their root folder
        if key not in cache:
            while len(cache) >= 2:
                _, old = cache.popitem()
                with self._lock:
                    self._opened.remove(old)
                old.close()
            slide = self.open(path, self._mpp.get(slide_id, self.slide_mpp), self._readers.get(slide_id), images)
            cache[key] = slide
            with self._lock:
                self._opened.append(slide)
        return cache[key]

    def read_into(self, out: np.ndarray, slide_id: str, coords: np.ndarray) -> None:
        """Fill ``out`` (len(coords), S, S, 3) uint8 with *slide_id*'s patches at level-0 *coords*."""
        slide = self._slide(slide_id)
        size0 = self._size0[slide_id]
        for i, (x, y) in enumerate(coords):
            out[i] = slide.read_patch((int(x), int(y)), size0, self.input_size, self.interpolation,
                                      self.resize_size)

    def read_rgb(self, slide_id: str, coords: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 patches, read on the calling thread."""
        out = np.empty((len(coords), self.input_size, self.input_size, 3), dtype=np.uint8)
        self.read_into(out, slide_id, coords)
        return out

    def read_on_device(self, slide_id: str, coords: np.ndarray) -> Tensor:
        """(B, 3, S, S) uint8 patches on ``decode_device``: native slides decode their JPEG tiles
        there (:mod:`featstore.read.devicedecode`), other slides are read on the CPU and copied."""
        from featstore.read.devicedecode import read_patches, supports

        slide = self._slide(slide_id)
        if isinstance(slide, NativeSlide) and supports(self.interpolation):
            return read_patches(slide, coords, self._size0[slide_id], self.input_size, self.interpolation,
                                self.resize_size, self.decode_device)
        rgb = torch.from_numpy(self.read_rgb(slide_id, coords)).permute(0, 3, 1, 2)
        return rgb.to(self.decode_device)

    def stained(self, rgb: Tensor) -> Tensor:
        """(B, 3, S, S) uint8 through the stain normaliser (unchanged without one)."""
        return rgb if self.stain is None or not len(rgb) else self.stain(rgb)

    def normalise(self, rgb: np.ndarray | Tensor) -> Tensor:
        """(B, S, S, 3) uint8 array, or a (B, 3, S, S) uint8 tensor, -> stain-normalised (when the
        source has a normaliser), then mean/std-normalised (B, 3, S, S) float32 on the tensor's
        device (CPU arrays pinned when feeding CUDA)."""
        if isinstance(rgb, Tensor):
            mean, std = self.mean.to(rgb.device), self.std.to(rgb.device)
            return self.stained(rgb).float().sub_(mean).div_(std).contiguous()
        t = self.stained(torch.from_numpy(rgb).permute(0, 3, 1, 2)).float()
        t = t.sub_(self.mean).div_(self.std).contiguous()
        return t.pin_memory() if self.pin else t

    def submit(self, slide_id: str, coords: np.ndarray) -> Callable[[], Tensor]:
        """Start reading, split over the worker threads; returns a function giving the batch."""
        coords = np.asarray(coords)
        parts = [p for p in np.array_split(coords, min(self.workers, max(1, len(coords)))) if len(p)]
        read = self.read_rgb if self.decode_device is None else self.read_on_device
        futures: list[Future] = [self.pool.submit(read, slide_id, p) for p in parts]

        def result() -> Tensor:
            if not futures:
                return self.normalise(np.zeros((0, self.input_size, self.input_size, 3), np.uint8))
            got = [f.result() for f in futures]
            return self.normalise(torch.cat(got) if self.decode_device is not None else np.concatenate(got))

        return result

    def read(self, slide_id: str, coords: np.ndarray) -> Tensor:
        """(B, 3, S, S) normalised float32 patches of *slide_id* at *coords*."""
        return self.submit(slide_id, coords)()

    def stream(self, items: Sequence[tuple[str, np.ndarray]]) -> Iterator[tuple[str, Tensor]]:
        """Yield (slide_id, batch) for *items*, the next item read while the current one is used."""
        pending: Callable[[], Tensor] | None = None
        for i, (sid, coords) in enumerate(items):
            if pending is None:
                pending = self.submit(sid, coords)
            nxt = self.submit(*items[i + 1]) if i + 1 < len(items) else None
            yield sid, pending()
            pending = nxt

    def _read_batch(self, segments: Sequence[tuple[str, np.ndarray]],
                    skip: Callable[[int], bool] | None) -> tuple[Tensor, dict[int, str]]:
        n, s = sum(len(c) for _, c in segments), self.input_size
        on_device = self.decode_device is not None
        batch = torch.zeros((n, 3, s, s), dtype=torch.uint8, device=self.decode_device) if on_device else \
            np.zeros((n, s, s, 3), dtype=np.uint8)
        errors: dict[int, str] = {}
        i = 0
        for si, (sid, coords) in enumerate(segments):
            try:
                if skip is not None and skip(si):
                    pass
                elif on_device:
                    batch[i:i + len(coords)] = self.read_on_device(sid, coords)
                else:
                    self.read_into(batch[i:i + len(coords)], sid, coords)
            except (FeatstoreError, OSError) as exc:
                errors[si] = str(exc)
            i += len(coords)
        return self.normalise(batch), errors

    def submit_batch(self, segments: Sequence[tuple[str, np.ndarray]],
                     skip: Callable[[int], bool] | None = None) -> Future:
        """Read one batch made of (slide_id, coords) segments, possibly of several slides, on one thread.

        The future gives ``(batch, {segment index: reason})``: a segment whose slide fails (or
        for which ``skip(index)`` is true when its turn comes) is zero-filled, so one corrupt
        slide never costs its batch-mates.
        """
        return self.pool.submit(self._read_batch, list(segments), skip)

    def close(self) -> None:
        """Stop the threads and close every handle any thread opened."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for s in self._opened:
                s.close()
            self._opened.clear()

    def __enter__(self) -> "TileSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _image_root(slides: Sequence[str]) -> Path:
    """The image root named by ``--slides``: the folder itself, or the folder of its CSV."""
    p = Path(slides[0]).expanduser()
    return p if p.is_dir() else p.parent


def _check_file(path: Path, slide_id: str, info: Mapping, store) -> None:
    try:
        with Slide(path, mpp=info.get("slide_mpp")) as slide:
            check_fingerprint(slide, info.get("fingerprint"), f"{store.path} as {slide_id!r}",
                              "pass the original slide with --slides")
    except SlideChangedError:
        raise
    except FeatstoreError as exc:
        raise type(exc)(f"{path}: cannot open slide {slide_id} ({exc})") from None


__all__ = ["TileSource", "check_fingerprint", "find_slide_files"]
