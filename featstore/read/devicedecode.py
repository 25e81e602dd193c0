"""The native reader's device path: a batch's JPEG tiles decoded together on the GPU (nvJPEG).

For a batch of patches of one slide, the compressed tiles they need are fetched once
(``os.pread``), made stand-alone (:func:`featstore.read.jpeg.complete`: shared tables, RGB marker),
optionally pinned, and decoded in ONE ``torchvision.io.decode_jpeg(list, device=...)`` call;
patches are assembled, resized (``F.interpolate(..., antialias=True)``) and centre-cropped on
the device and go straight to the encoder. Decoded tiles stay in the slide's
:class:`~featstore.read.native.TileCache` (keyed by device), so the next batch reuses its
neighbours'. The same code runs with device ``"cpu"``, which is how the tests exercise it;
the CPU extractor itself uses :meth:`NativeSlide.read_patch` (libjpeg-turbo with DCT scaling).

Differences from the CPU path, both within JPEG-decoder noise: no DCT-domain scaling (nvJPEG
decodes at full size) and a fractional level offset is rounded to the nearest pixel.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from featstore.errors import SlideReadError
from featstore.read.jpeg import complete, is_whole
from featstore.read.native import NativeSlide, PatchPlan

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}


def supports(interpolation: str) -> bool:
    """Whether the device path can resize with the encoder's *interpolation* (else use the CPU one)."""
    return str(interpolation).lower() in _MODES


def _decode(slide: NativeSlide, keys: list[tuple[int, int, int]], device: torch.device) -> list[Tensor]:
    """HWC uint8 tiles (level, col, row) of *slide*, decoded in one call on *device*."""
    datas = []
    for level, col, row in keys:
        lv = slide.layout.levels[level]
        index = row * lv.cols + col
        raw = slide._raw(level, index)
        if not is_whole(raw):
            raise SlideReadError(f"{slide.path}: corrupt JPEG tile ({col}, {row}) of level {level} ({lv.page}): "
                                 "the stream is cut off (no end-of-image marker)")
        t = torch.frombuffer(bytearray(complete(raw, lv.tables, lv.rgb)), dtype=torch.uint8)
        datas.append(t.pin_memory() if device.type == "cuda" else t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torchvision 0.29: "use TorchCodec" (same libs)
        warnings.simplefilter("ignore", UserWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            raise SlideReadError(f"{slide.path}: a JPEG tile of this batch does not decode ({exc})") from None
    return [t.permute(1, 2, 0) for t in out]


def _tiles(slide: NativeSlide, plans: Sequence[PatchPlan], device: torch.device) -> dict:
    """{(level, col, row): HWC tile} for every tile *plans* need, decoding only the uncached ones."""
    want = list(dict.fromkeys((p.level, c, r) for p in plans for c, r in slide.tiles_of(p)))
    cache, have = slide.cache, {}
    todo = []
    for key in want:
        lv = slide.layout.levels[key[0]]
        if _absent(lv, key):
            have[key] = torch.full((lv.tile_h, lv.tile_w, 3), 255, dtype=torch.uint8, device=device)
            continue
        hit = cache.peek((slide.path, *key, 1, str(device)))
        if hit is None:
            todo.append(key)
        else:
            have[key] = hit
    if todo:
        for key, tile in zip(todo, _decode(slide, todo, device)):
            have[key] = cache.get((slide.path, *key, 1, str(device)), lambda t=tile: t)
    return have


def _absent(lv, key: tuple[int, int, int]) -> bool:
    """A sparse tile (no bytes, e.g. Philips background): white."""
    index = key[2] * lv.cols + key[1]
    return index >= len(lv.counts) or lv.counts[index] == 0


def read_patches(slide: NativeSlide, coords: np.ndarray, size0: int, out_size: int,
                 interpolation: str = "bilinear", resize_size: int | None = None,
                 device: str | torch.device = "cpu") -> Tensor:
    """(B, 3, out_size, out_size) uint8 patches of *slide* at level-0 *coords*, on *device*.

    As :meth:`NativeSlide.read_patch` (same level, resize, centre crop) with the tiles
    decoded by ``decode_jpeg`` on *device*.
    """
    device = torch.device(device)
    mode = _MODES[str(interpolation).lower()]
    full = max(out_size, int(resize_size or out_size))
    plans = [slide.plan((int(x), int(y)), size0, full, dct=False) for x, y in coords]
    tiles = _tiles(slide, plans, device)
    out = torch.empty((len(plans), 3, out_size, out_size), dtype=torch.uint8, device=device)
    top = int(round((full - out_size) / 2.0))
    for i, p in enumerate(plans):
        white = torch.full((p.y1 - p.y0 + 1, p.x1 - p.x0 + 1, 3), 255, dtype=torch.uint8, device=device)
        canvas = slide.region(p.level, 1, p.x0, p.y0, p.x1 + 1, p.y1 + 1,
                              tile=lambda c, r, lv=p.level: tiles[(lv, c, r)], out=white)
        bx, by = int(round(p.box[0])), int(round(p.box[1]))
        side = max(1, int(round(p.box[2] - p.box[0])))
        chw = canvas[by:by + side, bx:bx + side].permute(2, 0, 1)
        if side != full:
            x = F.interpolate(chw[None].float(), size=(full, full), mode=mode, antialias=mode != "nearest-exact",
                              **({} if mode == "nearest-exact" else {"align_corners": False}))
            chw = x[0].round_().clamp_(0, 255).to(torch.uint8)
        out[i] = chw[:, top:top + out_size, top:top + out_size]
    return out


__all__ = ["read_patches", "supports"]
