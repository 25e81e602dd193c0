"""End-to-end fine-tuning on labelled patches: a registry encoder (truncated at ``minus``) + a
linear head, trained on the images' pixels (read back through featstore's TileSource, batched by
the same TileFeed pretraining uses).

The encoder starts from any weights tag (random, ImageNet, a paper's, a `featstore pretrain`
output, a fine-tuned file) and trains all the stages its level runs or only the last N
(``train_blocks``). Epochs run through :func:`featstore.core.fit.fit`; the epoch with the lowest
validation loss is kept. Training tiles are augmented the way pathology allows (flips, 90°
rotations, mild colour jitter; :mod:`featstore.train.augment`), each step seeded, so a seed
gives the same weights on the CPU. The result carries the logits of the validation and test
images, which the same metrics and calibration code as the probes then scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from featstore.core import fit as core_fit
from featstore.core.runtime import cpu_threads, deterministic, resolve_device
from mil.patches.config import FinetuneSettings  # noqa: F401  (re-exported: its home until issue 19)
from mil.patches.errors import PatchError

log = logging.getLogger(__name__)

Item = tuple[str, int]      # (image shard id, row of the shard)


class PatchModel(nn.Module):
    """A featstore encoder returning one level and a linear classifier on its pooled embedding."""

    def __init__(self, encoder, minus: int, n_classes: int):
        super().__init__()
        self.encoder, self.minus = encoder, int(minus)
        self.head = nn.Linear(int(encoder.dims[self.minus]), int(n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[self.minus].float())

    def train_mode(self, freeze_bn: bool = False) -> None:
        """Train mode; with *freeze_bn* BatchNorm keeps its statistics (eval mode)."""
        self.train()
        if freeze_bn:
            self.encoder.set_batchnorm_eval()


@dataclass
class FinetuneFit:
    """The fine-tuned model and its logits on the validation and test images."""

    model: PatchModel = field(repr=False)
    logits: dict[str, np.ndarray]
    history: dict
    best_epoch: int
    trained_modules: list[str]


def _step_seed(seed: int, epoch: int, step: int) -> int:
    return (int(seed) * 1_000_003 + epoch * 104_729 + step * 7_919 + 29) % (2**63 - 1)


def _batches(items: Sequence[Item], bs: int) -> list[list[Item]]:
    return [list(items[i:i + bs]) for i in range(0, len(items), bs)]


@dataclass
class _Job:
    model: PatchModel
    reader: object                             # featstore.train.feed.TileFeed
    normalise: Callable[[torch.Tensor], torch.Tensor]
    settings: FinetuneSettings
    device: torch.device
    precision: str
    seed: int
    on_step: Callable[[str, int, int, float], None]

    def logits(self, items: Sequence[Item]) -> np.ndarray:
        """Logits (N, C) float64 of *items* in eval mode."""
        from featstore.encoders import autocast

        self.model.eval()
        out = []
        with torch.inference_mode():
            for batch in _batches(items, max(self.settings.batch_size, 64)):
                x = self.normalise(self.reader.read(batch))
                with autocast(self.precision, self.device):
                    out.append(self.model(x).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, self.model.head.out_features))


def _train_epoch(job: _Job, items: Sequence[Item], y: dict[Item, int],
                 opt: torch.optim.Optimizer) -> Callable[[int], float]:
    from featstore.encoders import autocast
    from featstore.train.augment import augmenter

    cfg = job.settings
    aug = augmenter("light", job.reader.size, cfg.hed_jitter) if cfg.augment else (lambda b: b)

    def train_epoch(epoch: int) -> float:
        order = np.random.default_rng([job.seed, epoch, 11]).permutation(len(items))
        batches = _batches([items[i] for i in order], cfg.batch_size)

        def steps():
            for step, batch in enumerate(batches):
                torch.manual_seed(_step_seed(job.seed, epoch, step))
                x = job.normalise(aug(job.reader.read(batch)))
                t = torch.tensor([y[it] for it in batch], device=job.device)
                job.model.train_mode(cfg.freeze_bn)
                opt.zero_grad(set_to_none=True)
                with autocast(job.precision, job.device):
                    logits = job.model(x)
                loss = nn.functional.cross_entropy(logits.float(), t)
                loss.backward()
                opt.step()
                yield float(loss.detach())

        return core_fit.mean_loss(steps(), lambda done, mean: job.on_step("train", done, len(batches), mean))

    return train_epoch


def _evaluate(job: _Job, items: Sequence[Item], y: dict[Item, int]) -> Callable[[int], dict[str, float]] | None:
    if not items:
        return None
    target = np.array([y[it] for it in items])

    def evaluate(epoch: int) -> dict[str, float]:
        logits = torch.from_numpy(job.logits(items))
        loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(target)))
        acc = float((logits.argmax(1).numpy() == target).mean())
        job.on_step("val", len(items), len(items), loss)
        return {"val_loss": loss, "val_accuracy": acc}

    return evaluate


def finetune_patches(store, table, split: dict[str, np.ndarray], *, encoder: str, weights: str, minus: int,
                     settings: FinetuneSettings, seed: int = 0, init_seed: int | None = None,
                     preprocessing: Mapping | None = None, head: tuple[np.ndarray, np.ndarray] | None = None,
                     slides: Sequence[str] | None = None, stain=None,
                     on_step: Callable[[str, int, int, float], None] | None = None) -> FinetuneFit:
    """Fine-tune *encoder* (*weights*, level *minus*) + a linear head on ``split["train"]`` rows of
    *table* (a :class:`featstore.read.images.ImageTable`), pick the epoch by ``split["val"]``; logits of
    ``val`` and ``test`` rows come back in :attr:`FinetuneFit.logits`. *init_seed* seeds random
    weights (default *seed*); *preprocessing* (the stored features' provenance) overrides the
    encoder's own, so the images are read at the size the features were computed at. *head*
    (W, b) starts the linear head (LP-FT: the probe's solution on the same features)."""
    from featstore import create_encoder
    from featstore.train.feed import TileFeed
    from featstore.encoders import resolve_precision

    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    items = [(str(s), int(r)) for s, r in zip(table.slide_ids, table.rows)]
    y = {it: int(c) for it, c in zip(items, table.y)}
    pick = lambda name: [items[i] for i in split.get(name, [])]  # noqa: E731
    with deterministic(seed, device), cpu_threads(settings.threads):
        enc = create_encoder(encoder, weights, levels=(int(minus),), seed=seed if init_seed is None else init_seed)
        enc.set_trainable(settings.train_blocks)
        model = PatchModel(enc, minus, len(table.classes))
        if head is not None:
            with torch.no_grad():
                model.head.weight.copy_(torch.as_tensor(head[0], dtype=torch.float32))
                model.head.bias.copy_(torch.as_tensor(head[1], dtype=torch.float32))
        model = model.to(device)
        shards = sorted({s for s, _ in items})
        pre = {**enc.preprocessing(), **{k: v for k, v in dict(preprocessing or {}).items() if v}}
        feed = TileFeed(store, shards, pre, slides=slides, workers=settings.workers, pin=device.type == "cuda",
                        stain=stain)
        try:
            job = _Job(model, feed, feed.source.normalise, settings, device, precision, seed,
                       on_step or (lambda *a: None))
            params = [p for p in enc.parameters() if p.requires_grad]
            groups = [{"params": params, "lr": settings.lr}, {"params": model.head.parameters(), "lr": settings.head_lr}]
            opt = (torch.optim.SGD(groups, momentum=0.9, weight_decay=settings.weight_decay)
                   if settings.optimizer == "sgd" else torch.optim.AdamW(groups, weight_decay=settings.weight_decay))

            def diverged(epoch: int, loss: float) -> PatchError:
                return PatchError(f"fine-tuning diverged at epoch {epoch} (loss {loss}); lower --lr/--head-lr")

            fit = core_fit.fit(model, _train_epoch(job, pick("train"), y, opt), _evaluate(job, pick("val"), y),
                               epochs=settings.epochs, patience=settings.patience, monitor="val_loss_only",
                               diverged=diverged)
            logits = {name: job.logits(pick(name)) for name in ("val", "test")}
        finally:
            feed.close()
    model.cpu().eval()
    trained = [n for n, _ in enc.trainable_modules(settings.train_blocks)]
    return FinetuneFit(model, logits, fit.as_dict(("val_loss", "val_accuracy")), fit.best_epoch, trained)


__all__ = ["FinetuneSettings", "FinetuneFit", "PatchModel", "finetune_patches"]
