"""Pretraining runs: one encoder per data subset, resumable step by step, with provenance.

Every step is a pure function of (seed, step): the batch comes from a per-epoch permutation
(:func:`~featstore.pretrain.sampling.epoch_order`), and torch's RNG is reseeded before the
step's augmentations and masks. So a run killed at any point and restarted from its last
checkpoint (``pretrain_state.pt``, written atomically every ``checkpoint_every`` steps) ends
with the same weights as one that never stopped. Epochs go through :func:`featstore.core.fit.fit`, the
toolkit's one training loop. The output of a subset, in ``OUT/<subset>/``:

- ``pretrain-<method>-<out>-<subset>.pt``: a ``featstore-encoder/1`` checkpoint (the full
  state dict in the registry's layout); ``--weights`` takes it and records the tag
  ``pretrain-<method>-<out>-<subset>-<sha8>``;
- ``provenance.json``, ``loss.png`` and, for MAE, ``reconstructions.png``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from featstore.core import fit as core_fit
from featstore.core.runtime import resolve_device
from featstore.checkpoint import file_tag, save_encoder
from featstore.errors import PretrainError
from featstore.train.augment import augmenter
from featstore.pretrain.config import PretrainConfig
from featstore.pretrain.data import store_fingerprint, tile_counts
from featstore.train.feed import Item, TileFeed
from featstore.pretrain.methods import build_method, method_for
from featstore.pretrain.sampling import epoch_order, nested_order, split, subset_size

log = logging.getLogger(__name__)
STATE = "pretrain_state.pt"
OnStep = Callable[[str, int, int, float], None]      # (subset, step done, total steps, loss)


@dataclass
class PretrainResult:
    """One subset's encoder: where it is, its tag, and what training did."""

    subset: str
    path: Path
    tag: str
    tiles: int
    steps: int
    epoch_loss: list[float] = field(default_factory=list)
    holdout_loss: tuple[float | None, float | None] = (None, None)
    resumed_at: int = 0
    reused: bool = False        # already complete in OUT: nothing trained this time

    @property
    def loss_drop(self) -> float:
        """1 - last epoch's mean loss / first epoch's."""
        return 1.0 - self.epoch_loss[-1] / self.epoch_loss[0] if len(self.epoch_loss) > 1 else 0.0


@dataclass
class _Run:
    """What every subset of one `featstore pretrain` call shares."""

    cfg: PretrainConfig
    store: object
    out: Path
    feed: TileFeed
    pool: list[Item]
    holdout: list[Item]
    method: str
    device: torch.device
    precision: str
    fingerprint: str
    on_step: OnStep | None = None


def _lr(cfg: PretrainConfig, step: int, total: int) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to 0."""
    warm = max(1, int(round(cfg.warmup * total)))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _normaliser(pre: dict, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = torch.tensor(pre["mean"], device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pre["std"], device=device).view(1, 3, 1, 1) * 255.0
    return lambda x: (x.to(device, non_blocking=True).float() - mean) / std


def _step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 17) % (2**63 - 1)


class _Trainer:
    """One subset's training: model, optimiser, schedule, checkpoints."""

    def __init__(self, run: _Run, name: str, subset: list[Item]):
        from featstore.encoders import create_encoder

        cfg = run.cfg
        self.run, self.name, self.subset, self.cfg = run, name, subset, cfg
        self.dir = run.out / name
        torch.manual_seed(cfg.seed)
        self.encoder = create_encoder(cfg.encoder, cfg.weights, levels=(0,), seed=cfg.seed)
        self.start_tag, self.start_sha = self.encoder.weights_tag, self.encoder.weights_sha256
        self.model = build_method(run.method, self.encoder, cfg).to(run.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        bs = min(cfg.batch_size, len(subset))
        self.bs, self.per_epoch = bs, max(1, len(subset) // bs)
        self.total = cfg.epochs * self.per_epoch
        self.augment = augmenter(self.model.augmentation, run.feed.size, cfg.hed_jitter)
        self.normalise = _normaliser(self.encoder.preprocessing(), run.device)
        self.losses: list[float] = []
        self.holdout_start: float | None = None
        self.seconds = {"waiting_for_tiles": 0.0, "steps": 0.0}     # this process's share of the run
        self.resumed_at = self._resume()

    # ------------------------------------------------------------------ state
    def _config_doc(self) -> dict:
        return {**self.run.cfg.to_dict(), "method": self.run.method, "subset": self.name,
                "tiles": len(self.subset), "store_fingerprint": self.run.fingerprint}

    def _resume(self) -> int:
        path = self.dir / STATE
        if not path.is_file():
            return 0
        state = torch.load(path, map_location="cpu", weights_only=True)
        if json.loads(state["config"]) != json.loads(json.dumps(self._config_doc(), default=str)):
            raise PretrainError(f"{path}: an interrupted run with a different config or store; pass a new --out "
                                "or delete that folder")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.losses = [float(v) for v in state["losses"]]
        self.holdout_start = state.get("holdout_start")
        log.info("%s: resuming at step %d of %d", self.dir, len(self.losses), self.total)
        return len(self.losses)

    def _checkpoint(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (STATE + ".tmp")
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "losses": list(self.losses),
                    "holdout_start": self.holdout_start,
                    "config": json.dumps(self._config_doc(), default=str)}, tmp)
        os.replace(tmp, self.dir / STATE)

    # ------------------------------------------------------------------ steps
    def items(self, step: int) -> list[Item]:
        epoch, i = divmod(step, self.per_epoch)
        order = epoch_order(len(self.subset), self.cfg.seed, epoch)
        return [self.subset[j] for j in order[i * self.bs:(i + 1) * self.bs]]

    def step(self, step: int, tiles: torch.Tensor) -> float:
        from featstore.encoders import autocast

        for group in self.opt.param_groups:
            group["lr"] = _lr(self.cfg, step, self.total)
        torch.manual_seed(_step_seed(self.cfg.seed, step))
        views = [self.normalise(self.augment(tiles)) for _ in range(self.model.views)]
        self.model.train()
        with autocast(self.run.precision, self.run.device):
            loss = self.model.loss(views)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def holdout_loss(self) -> float | None:
        """The loss on the held-out tiles, no augmentation, a fixed seed: comparable across steps."""
        if not self.run.holdout:
            return None
        from featstore.encoders import autocast

        self.model.eval()
        torch.manual_seed(_step_seed(self.cfg.seed, -1))
        tiles = self.run.feed.read(self.run.holdout)
        views = [self.normalise(tiles)] if self.model.views == 1 else \
            [self.normalise(self.augment(tiles)) for _ in range(self.model.views)]
        with autocast(self.run.precision, self.run.device):
            return float(self.model.loss(views))

    def train_epoch(self, epoch: int) -> float:
        first, last = (epoch - 1) * self.per_epoch, epoch * self.per_epoch
        start = max(first, len(self.losses))              # a resumed run skips the steps it did
        pending = self.run.feed.submit(self.items(start)) if start < last else None
        for g in range(start, last):
            t0 = time.perf_counter()
            tiles = pending.result()
            pending = self.run.feed.submit(self.items(g + 1)) if g + 1 < last else None
            t1 = time.perf_counter()
            self.losses.append(self.step(g, tiles))
            self.seconds["waiting_for_tiles"] += t1 - t0
            self.seconds["steps"] += time.perf_counter() - t1
            if self.run.on_step is not None:
                self.run.on_step(self.name, g + 1, self.total, self.losses[-1])
            if (g + 1) % self.cfg.checkpoint_every == 0:
                self._checkpoint()
        return core_fit.mean_loss(self.losses[first:last])

    def fit(self) -> list[float]:
        """Every epoch through the toolkit's training loop; the mean loss of each."""
        if self.holdout_start is None:
            self.holdout_start = self.holdout_loss()
            self._checkpoint()

        def diverged(epoch: int, loss: float) -> PretrainError:
            return PretrainError(f"pretraining diverged at epoch {epoch} (loss {loss}); lower --lr")

        result = core_fit.fit(self.model, self.train_epoch, epochs=self.cfg.epochs, diverged=diverged)
        return [r.train_loss for r in result.history]


def _provenance(t: _Trainer, epoch_loss: list[float], holdout_end: float | None) -> dict:
    from featstore import __version__

    import lightly
    import timm

    run = t.run
    per_slide: dict[str, int] = {}
    for sid, _ in t.subset:
        per_slide[sid] = per_slide.get(sid, 0) + 1
    return {
        "method": run.method, "encoder": t.encoder.name, "start_weights": t.start_tag,
        "start_weights_sha256": t.start_sha, "store": str(run.store.path), "store_fingerprint": run.fingerprint,
        "tiling": run.store.tiling, "subset": t.name, "tiles": len(t.subset), "tiles_per_slide": per_slide,
        "holdout_tiles": len(run.holdout), "epochs": t.cfg.epochs, "steps": t.total, "batch_size": t.bs,
        "config": t.cfg.to_dict(), "seed": t.cfg.seed, "precision": run.precision,
        "loss_per_epoch": epoch_loss, "loss_per_step": t.losses,
        "holdout_loss": [t.holdout_start, holdout_end], "resumed_at_step": t.resumed_at,
        "seconds": {k: round(v, 3) for k, v in t.seconds.items()},
        "featstore_version": __version__, "torch_version": torch.__version__, "timm_version": timm.__version__,
        "lightly_version": lightly.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _finish(t: _Trainer, epoch_loss: list[float]) -> PretrainResult:
    from featstore.pretrain.pictures import loss_plot, reconstructions

    holdout_end = t.holdout_loss()
    prov = json.loads(json.dumps(_provenance(t, epoch_loss, holdout_end), default=str))   # plain data only
    stem = f"pretrain-{t.run.method}-{t.run.out.name}-{t.name}"
    path = save_encoder(t.encoder, t.dir / f"{stem}.pt", level=0, extra={"pretrain": prov})
    prov["weights_tag"] = file_tag(path)
    (t.dir / "provenance.json").write_text(json.dumps(prov, indent=2, default=str))
    loss_plot(t.losses, epoch_loss, prov["holdout_loss"], t.per_epoch, t.dir / "loss.png",
              f"{t.run.method} {t.encoder.name} {t.name}")
    if t.run.method == "mae" and t.run.holdout:
        torch.manual_seed(_step_seed(t.cfg.seed, -2))
        reconstructions(t.model, t.run.feed.read(t.run.holdout[:6]), t.normalise, t.encoder.preprocessing(),
                        t.dir / "reconstructions.png")
    (t.dir / STATE).unlink(missing_ok=True)
    return _result(t.name, prov, path)


def _result(name: str, prov: dict, path: Path) -> PretrainResult:
    return PretrainResult(subset=name, path=path, tag=prov["weights_tag"], tiles=prov["tiles"], steps=prov["steps"],
                          epoch_loss=list(prov["loss_per_epoch"]), holdout_loss=tuple(prov["holdout_loss"]),
                          resumed_at=int(prov.get("resumed_at_step", 0)))


def _done(run: _Run, name: str) -> PretrainResult | None:
    """The result of a subset already complete in ``OUT`` (a rerun does not retrain it)."""
    prov_path = run.out / name / "provenance.json"
    if not prov_path.is_file():
        return None
    prov = json.loads(prov_path.read_text())
    path = run.out / name / f"pretrain-{run.method}-{run.out.name}-{name}.pt"
    if not path.is_file():
        return None
    result = _result(name, prov, path)
    result.reused = True
    return result


def pretrain(cfg: PretrainConfig, store, out: str | Path, *, slides=None,
             on_step: OnStep | None = None) -> list[PretrainResult]:
    """Pretrain ``cfg.encoder`` on *store*'s tiles, one encoder per subset; see the module docstring."""
    from featstore.encoders import create_encoder, resolve_precision
    from featstore.store import open_store

    store = open_store(store) if isinstance(store, (str, Path)) else store
    counts = tile_counts(store)
    pool, holdout = split(nested_order(counts, cfg.seed), cfg.holdout)
    device = resolve_device(cfg.device)
    probe = create_encoder(cfg.encoder, cfg.weights, levels=(0,), seed=cfg.seed)
    method = method_for(cfg.method, probe)
    feed = TileFeed(store, sorted(counts), probe.preprocessing(), slides=slides, workers=cfg.workers)
    run = _Run(cfg, store, Path(out), feed, pool, holdout, method, device, resolve_precision(cfg.precision, device),
               store_fingerprint(store, counts), on_step)
    del probe
    results = []
    try:
        for name, fraction, tiles in cfg.subsets():
            done = _done(run, name)
            if done is not None:
                results.append(done)
                continue
            t = _Trainer(run, name, pool[:subset_size(len(pool), fraction, tiles)])
            results.append(_finish(t, t.fit()))
    finally:
        feed.close()
    return results


__all__ = ["PretrainResult", "STATE", "pretrain"]
