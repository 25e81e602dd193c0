"""Deep tissue segmenters with the user's own weights: ``--mask grandqc|hest --mask-weights FILE``.

The architectures are built here (segmentation_models_pytorch, torchvision) and the weights are
read from the given file with ``torch.load(weights_only=True)``, never downloaded. Each
segmenter runs at the resolution it was trained at, in windows read from the slide; windows
where the thumbnail shows nothing but glass are not run. The tissue probability of each window
is averaged down onto the thumbnail grid of the other masks, thresholded at 0.5 and cleaned up
like them (:mod:`featstore.masks` registers them), so tiling, ``featstore tiles --compare`` and the store's tiling key work unchanged.

* ``grandqc``: GrandQC's tissue detector (Weng et al. 2024): UNet++ on timm-efficientnet-b0,
  2 classes (0 = tissue), 512 px windows at 10 µm/px, ImageNet normalisation, windows JPEG
  compressed at quality 80 as in its training. File: ``Tissue_Detection_MPP10.pth``.
* ``hest``: HEST's tissue segmenter (Jaume et al. 2024): torchvision DeepLabV3-ResNet50 with a
  2-class head (1 = tissue), 512 px windows at 1 µm/px (10x), ImageNet normalisation. File:
  ``deeplabv3_seg_v4.ckpt`` (a Lightning checkpoint; its ``model.`` prefix and aux head are dropped).
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featstore.errors import TilingError

log = logging.getLogger(__name__)

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_BATCH = 8
_GLASS_SATURATION = 0.03     # a window whose thumbnail footprint is all below this and bright is glass
_GLASS_BRIGHT = 220


def _unetpp_effnet_b0():
    import warnings

    import segmentation_models_pytorch as smp

    with warnings.catch_warnings():    # smp deprecates its "timm-" encoders; GrandQC's weights are keyed for this one
        warnings.filterwarnings("ignore", message=".*timm-. encoders are deprecated", category=DeprecationWarning)
        return smp.UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=2,
                                activation=None)


def _deeplabv3_resnet50():
    from torchvision.models.segmentation import deeplabv3_resnet50

    return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2, aux_loss=False)


@dataclass(frozen=True)
class Segmenter:
    """A tissue segmenter's architecture and how it was trained to be used."""

    name: str
    build: Callable[[], Any]          # -> torch.nn.Module with random weights
    mpp: float                        # µm/px of its input
    window: int                       # input side in px
    tissue_class: int                 # output channel of tissue
    weights_file: str                 # the authors' file name, for messages
    source: str                       # where the authors publish it, for messages
    jpeg_quality: int | None = None   # windows re-encoded so, as in training
    drop_keys: tuple[str, ...] = ()   # state-dict keys containing these are not used (aux heads)

    def logits(self, model, x):
        out = model(x)
        return out["out"] if isinstance(out, dict) else out


SEGMENTERS: dict[str, Segmenter] = {
    "grandqc": Segmenter("grandqc", _unetpp_effnet_b0, mpp=10.0, window=512, tissue_class=0,
                         weights_file="Tissue_Detection_MPP10.pth", source="GrandQC, zenodo.org/records/14507273",
                         jpeg_quality=80),
    "hest": Segmenter("hest", _deeplabv3_resnet50, mpp=1.0, window=512, tissue_class=1,
                      weights_file="deeplabv3_seg_v4.ckpt", source="HEST, huggingface.co/MahmoodLab/hest-tissue-seg",
                      drop_keys=("aux",)),
}


def weights_help(name: str) -> str:
    """One line saying which file a segmenter needs and where its authors publish it."""
    seg = SEGMENTERS[name]
    return f"--mask {name} needs --mask-weights PATH ({seg.weights_file}, from {seg.source}); featstore never downloads"


@functools.lru_cache(maxsize=4)
def _load(name: str, path: str, stamp: tuple[int, int]):
    """(model in eval mode on its device, device, sha256) of segmenter *name* with the weights at *path*."""
    import torch

    from featstore.encoders.weights import WRAPPER_PREFIXES, read_checkpoint
    from featstore.errors import FeatstoreError

    seg = SEGMENTERS[name]
    try:
        ckpt = read_checkpoint(path, encoder=f"mask:{name}")
    except FeatstoreError as exc:
        raise TilingError(f"--mask-weights {path}: {exc}") from None
    model = seg.build()
    want = model.state_dict()
    sd = {}
    for key, value in ckpt.state_dict.items():
        if any(d in key for d in seg.drop_keys):
            continue
        while key not in want and key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        sd[key] = value
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or wrong:
        bad = (missing or unexpected or wrong)[:3]
        raise TilingError(f"--mask-weights {path}: not {name} weights ({len(missing)} missing, {len(unexpected)} "
                          f"unexpected, {len(wrong)} mis-shaped keys, e.g. {', '.join(bad)}); expected "
                          f"{seg.weights_file} from {seg.source}")
    model.load_state_dict(sd)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    log.info("--mask %s: %s (sha256 %s) on %s", name, path, ckpt.sha256[:12], device)
    return model, device, ckpt.sha256


def load_segmenter(name: str, path: str):
    """The segmenter *name* with the weights file *path* (cached per file and modification time)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TilingError(f"--mask-weights {path}: no such file; " + weights_help(name))
    st = p.stat()
    return _load(name, str(p.resolve()), (st.st_mtime_ns, st.st_size))


def weights_sha256(name: str, path: str) -> str:
    """sha256 of the segmenter's weights file (recorded in each slide's tiling provenance)."""
    return load_segmenter(name, path)[2]


def _windows(inp: Any, thumb: np.ndarray, size0: int) -> list[tuple[int, int]]:
    """Level-0 (x, y) of the windows whose thumbnail footprint holds anything but glass."""
    x = thumb.astype(np.float32)     # (featstore.masks imports this module: no import back)
    mx, mn = x.max(axis=2), x.min(axis=2)
    busy = ((mx - mn) / np.maximum(mx, 1) > _GLASS_SATURATION) | (mx < _GLASS_BRIGHT)
    w, h = inp.slide.dimensions
    ds = inp.downsample
    out = []
    for y in range(0, h, size0):
        for x0 in range(0, w, size0):
            ty0, tx0 = int(y / ds), int(x0 / ds)
            ty1, tx1 = int(math.ceil((y + size0) / ds)), int(math.ceil((x0 + size0) / ds))
            if busy[ty0:ty1, tx0:tx1].any():
                out.append((x0, y))
    return out


def _prepare(rgb: np.ndarray, seg: Segmenter) -> np.ndarray:
    if seg.jpeg_quality:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=seg.jpeg_quality)
        rgb = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    x = rgb.astype(np.float32) / 255.0
    return ((x - np.asarray(_MEAN, np.float32)) / np.asarray(_STD, np.float32)).transpose(2, 0, 1)


def segment(thumb: np.ndarray, inp: Any, name: str) -> np.ndarray:
    """Tissue probability (float32, the thumbnail's shape) of segmenter *name* on *inp*'s slide
    (a :class:`featstore.masks.MaskInput`: the slide, the tiling config, the thumbnail's downsample)."""
    import torch

    seg = SEGMENTERS[name]
    model, device, _ = load_segmenter(name, inp.config.mask_weights)
    slide = inp.slide
    size0 = max(1, int(round(seg.window * seg.mpp / slide.mpp)))
    prob = np.zeros(thumb.shape[:2], np.float32)
    windows = _windows(inp, thumb, size0)
    ds = inp.downsample
    for i in range(0, len(windows), _BATCH):
        batch = windows[i:i + _BATCH]
        x = np.stack([_prepare(slide.read_patch(xy, size0, seg.window), seg) for xy in batch])
        with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
            p = torch.softmax(seg.logits(model, torch.from_numpy(x).to(device)).float(), dim=1)[:, seg.tissue_class]
        for (x0, y0), pm in zip(batch, p.cpu().numpy()):
            _paste(prob, pm, x0 / ds, y0 / ds, size0 / ds)
    return prob


def _paste(prob: np.ndarray, pm: np.ndarray, tx: float, ty: float, side: float) -> None:
    """Average a window's probability map *pm* onto the thumbnail grid at (tx, ty), *side* px wide."""
    x0, y0 = int(round(tx)), int(round(ty))
    x1, y1 = min(prob.shape[1], int(round(tx + side))), min(prob.shape[0], int(round(ty + side)))
    if x1 <= x0 or y1 <= y0:
        return
    n = max(1, int(round(side)))
    small = np.asarray(Image.fromarray(pm).resize((n, n), Image.Resampling.BOX if n < pm.shape[0]
                                                  else Image.Resampling.BILINEAR))
    prob[y0:y1, x0:x1] = small[:y1 - y0, :x1 - x0]
