"""Train and evaluate one segmentation run: registry encoder + U-Net/U-Net++ decoder on image/mask
pairs, with nested training fractions, a seed, early stopping, and in- and out-of-domain tests.

Loss: Dice + cross-entropy (smp's DiceLoss, torch's CE). Training crops are augmented the way
tissue allows -- flips and 90° rotations applied to image and mask together, colour jitter on the
image only (torchvision v2) -- with per-step seeds, so a seed gives the same weights on the CPU.
Epochs run through :func:`featstore.core.fit.fit` (lowest validation loss kept, ``patience``). Evaluation
predicts whole images (padded to a multiple of 32) and scores them with :mod:`mil.seg.metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from featstore.core import fit as core_fit
from featstore.core.runtime import cpu_threads, deterministic, resolve_device
from mil.seg.config import SegConfig  # noqa: F401  (re-exported)
from mil.seg.errors import SegError


def split_images(n: int, cfg: SegConfig, groups: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Seeded test / val / train indices; the training part is cut to ``fraction`` as a prefix of
    one seeded order, so the subsets of one seed are nested.

    With *groups* (one name per image: the slide a WSI patch came from) whole groups go to one
    side: the test and validation shares are shares of the groups, so patches of one slide are
    never both trained on and tested on."""
    if groups is None:
        order = np.random.default_rng([cfg.seed, 17]).permutation(n)
        n_test, n_val = max(1, round(cfg.test * n)), round(cfg.val * n)
        test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
        if len(train) < 1:
            raise SegError(f"{n} images leave none for training with --test {cfg.test} --val {cfg.val}")
    else:
        if len(groups) != n:
            raise SegError(f"{len(groups)} group names for {n} images")
        names = sorted(set(groups))
        g_order = [names[i] for i in np.random.default_rng([cfg.seed, 17]).permutation(len(names))]
        n_test, n_val = max(1, round(cfg.test * len(names))), round(cfg.val * len(names))
        if cfg.val > 0:
            n_val = max(1, n_val)
        if len(names) - n_test - n_val < 1:
            raise SegError(f"{len(names)} slide(s) leave none for training with --test {cfg.test} --val {cfg.val}; "
                           f"patches are split by slide, so at least {n_test + n_val + 1} slides are needed")
        rank = {g: i for i, g in enumerate(g_order)}
        within = np.random.default_rng([cfg.seed, 18]).permutation(n)   # image order inside a group
        order = np.asarray(sorted(range(n), key=lambda i: (rank[groups[i]], within[i])))
        side = np.asarray([rank[groups[i]] for i in order])
        test, val, train = order[side < n_test], order[(side >= n_test) & (side < n_test + n_val)], \
            order[side >= n_test + n_val]
    return {"train": train[:max(1, round(cfg.fraction * len(train)))], "val": val, "test": test}


def _pad_to(x: torch.Tensor, multiple: int = 32, value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph), value=value), (h, w)


class _Data:
    """Images as uint8 (3, H, W) tensors and semantic masks as int64, kept in memory once;
    :meth:`x` normalises one image when it is predicted (a float copy of every image would
    take 4x the memory)."""

    def __init__(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], pre: dict):
        self.mean = torch.tensor(pre["mean"]).view(3, 1, 1) * 255.0
        self.std = torch.tensor(pre["std"]).view(3, 1, 1) * 255.0
        self.raw = [torch.tensor(np.asarray(im, np.uint8)).permute(2, 0, 1) for im in images]
        self.y = [torch.tensor(np.asarray(m, np.int64)) for m in masks]

    def x(self, i: int) -> torch.Tensor:
        """Image *i* normalised with the encoder's mean and std, (3, H, W) float32."""
        return (self.raw[i].float() - self.mean) / self.std

    def crop(self, i: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = self.raw[i], self.y[i]
        img, _ = _pad_to(img, size, 255) if min(img.shape[-2:]) < size else (img, None)
        msk, _ = _pad_to(msk[None], size, 0) if min(msk.shape[-2:]) < size else (msk[None], None)
        h, w = img.shape[-2:]
        y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        return img[:, y0:y0 + size, x0:x0 + size], msk[0, y0:y0 + size, x0:x0 + size]


def _augment(img: torch.Tensor, msk: torch.Tensor, jitter) -> tuple[torch.Tensor, torch.Tensor]:
    k = int(torch.randint(0, 4, (1,)))
    img, msk = torch.rot90(img, k, (1, 2)), torch.rot90(msk, k, (0, 1))
    if bool(torch.rand(1) < 0.5):
        img, msk = img.flip(2), msk.flip(1)
    return jitter(img), msk


def _loss_fn(classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from segmentation_models_pytorch.losses import DiceLoss

    dice = DiceLoss(mode="multiclass", from_logits=True)
    return lambda logits, y: dice(logits, y) + F.cross_entropy(logits, y)


def _train_epoch(model, data: _Data, idx: np.ndarray, cfg: SegConfig, opt, loss_fn, device) -> Callable[[int], float]:
    from torchvision.transforms import v2

    from featstore.stain import stain_jitter

    jitter = v2.RandomApply([v2.ColorJitter(0.15, 0.15, 0.1, 0.02)], p=0.8) if cfg.augment else (lambda t: t)
    stain = stain_jitter(cfg.hed_jitter if cfg.augment else 0.0)

    def train_epoch(epoch: int) -> float:
        rng = np.random.default_rng([cfg.seed, epoch, 5])
        order = idx[rng.permutation(len(idx))]
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]

        def steps():
            for step, b in enumerate(batches):
                torch.manual_seed((cfg.seed * 1_000_003 + epoch * 7_919 + step) % (2**63 - 1))
                pairs = [data.crop(int(i), cfg.crop, rng) for i in b]
                if cfg.augment:
                    pairs = [_augment(im, m, jitter) for im, m in pairs]
                x = (stain(torch.stack([p[0] for p in pairs])).float() - data.mean) / data.std
                y = torch.stack([p[1] for p in pairs])
                model.train()
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x.to(device)), y.to(device))
                loss.backward()
                opt.step()
                yield float(loss.detach())

        return core_fit.mean_loss(steps())

    return train_epoch


@torch.inference_mode()
def predict(model, data: _Data, idx: Sequence[int], device) -> list[np.ndarray]:
    """Argmax class maps of whole images (padded to a multiple of 32, cropped back)."""
    model.eval()
    out = []
    for i in idx:
        x, (h, w) = _pad_to(data.x(int(i))[None])
        out.append(model(x.to(device))[0, :, :h, :w].argmax(0).cpu().numpy())
    return out


def _evaluate(model, data: _Data, idx: np.ndarray, loss_fn, device) -> Callable[[int], dict] | None:
    if not len(idx):
        return None

    @torch.inference_mode()
    def evaluate(epoch: int) -> dict[str, float]:
        model.eval()
        losses = []
        for i in idx:
            x, (h, w) = _pad_to(data.x(int(i))[None])
            logits = model(x.to(device))[:, :, :h, :w]
            losses.append(float(loss_fn(logits, data.y[int(i)][None].to(device))))
        return {"val_loss": float(np.mean(losses))}

    return evaluate


@dataclass
class SegRun:
    """A trained model and what it scored; ``metrics`` per evaluation set (``test``, ``ood:<name>``)."""

    model: nn.Module = field(repr=False)
    encoder: object = field(repr=False)
    split: dict[str, np.ndarray]
    history: dict
    metrics: dict[str, dict] = field(default_factory=dict)
    predictions: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)


def train_segmenter(cfg: SegConfig, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                    on_epoch: Callable[[core_fit.EpochRecord], None] | None = None,
                    groups: Sequence[str] | None = None) -> SegRun:
    """Split (by *groups* when given: :func:`split_images`), train on the (fraction of the)
    training images, keep the best validation epoch; ``on_epoch`` after every epoch."""
    from mil.seg.model import build_segmenter

    device = resolve_device(cfg.device)
    split = split_images(len(images), cfg, groups)
    with deterministic(cfg.seed, device), cpu_threads(cfg.threads):
        model, enc = build_segmenter(cfg.arch, cfg.encoder, cfg.weights, classes=cfg.classes, seed=cfg.seed)
        model = model.to(device)
        data = _Data(images, masks, enc.preprocessing())
        enc_params = list(model.encoder.parameters())
        ids = {id(p) for p in enc_params}
        groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": cfg.lr}]
        if cfg.encoder_lr > 0:
            groups.append({"params": enc_params, "lr": cfg.encoder_lr})
        else:
            model.encoder.requires_grad_(False)
        opt = torch.optim.AdamW(groups, weight_decay=1e-4)
        loss_fn = _loss_fn(cfg.classes)

        def diverged(epoch: int, loss: float) -> SegError:
            return SegError(f"segmentation training diverged at epoch {epoch} (loss {loss}); lower --lr")

        fit = core_fit.fit(model, _train_epoch(model, data, split["train"], cfg, opt, loss_fn, device),
                           _evaluate(model, data, split["val"], loss_fn, device), epochs=cfg.epochs,
                           patience=cfg.patience, monitor="val_loss_only", diverged=diverged, on_epoch=on_epoch)
        run = SegRun(model, enc, split, fit.as_dict(("val_loss",)))
        run.predictions["test"] = predict(model, data, split["test"], device)
    return run


def evaluate_on(model: nn.Module, images: Sequence[np.ndarray], pre: dict, device="cpu") -> list[np.ndarray]:
    """Predictions of a trained model on other images (out-of-domain: no retraining)."""
    data = _Data(images, [np.zeros(im.shape[:2], np.int64) for im in images], pre)
    return predict(model, data, range(len(images)), torch.device(device))


def write_run(out: Path, cfg: SegConfig, run: SegRun, extra: dict | None = None) -> Path:
    """config.json (with the encoder's provenance), metrics.json, history.json, model.pt (weights only)."""
    from featstore import __version__

    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in run.model.state_dict().items()}, out / "model.pt")
    (out / "metrics.json").write_text(json.dumps(run.metrics, indent=2, default=float))
    (out / "history.json").write_text(json.dumps(run.history, indent=2))
    doc = {"kind": "segmentation", **asdict(cfg), "split": {k: v.tolist() for k, v in run.split.items()},
           "encoder_provenance": run.encoder.provenance(), "featstore_version": __version__, **(extra or {})}
    (out / "config.json").write_text(json.dumps(doc, indent=2, default=str))
    return out



__all__ = ["SegConfig", "SegRun", "evaluate_on", "predict", "split_images", "train_segmenter", "write_run"]
