"""Top-k end-to-end fine-tuning (HistoTransfer's second stage): `mil finetune`, as orchestration.

From a finished `mil train` run (:mod:`mil.parent`): for every slide take the k tiles with the
highest raw attention of the frozen head (:func:`mil.topk.frozen_topk`), read them straight
from the WSI at the store's coords (:class:`featstore.read.tilesource.TileSource`), and train the
run's truncated encoder + its head end to end (:mod:`mil.bagmodel`, epochs by
:func:`featstore.core.fit.fit`); then score the fold's test slides with the frozen run and with the
fine-tuned model, side by side, and write the fine-tuned encoder as a ``featstore-encoder/1``
checkpoint that ``featstore extract --weights`` accepts (:mod:`featstore.checkpoint`).

Choices (docs/finetune.md explains them):

* one fold per fine-tune run (``fold``, default the run's first): its training slides train,
  its validation slides pick the best epoch (lowest loss), its test slides are scored by both
  models, so the encoder.pt of the run belongs to exactly one head;
* test slides are scored on all their tiles by default (as HistoTransfer; ``eval_tiles="topk"``
  scores the frozen top-k only, cheaper).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from featstore.core import fit as core_fit
from featstore.core.runtime import cpu_threads, deterministic, resolve_device
from featstore.errors import FeatstoreError
from mil.bagmodel import BagModel, backward_bag, build_model, embed_slides, make_optimizer, train_step
from mil.config import FinetuneConfig, FinetuneSpec
from mil.errors import MilError
from mil.parent import Parent, load_parent, parent_encoder
from mil.run import RunWriter
from mil.scoring import bag_outputs, score_bags, val_metrics
from mil.topk import frozen_topk, select_topk

log = logging.getLogger(__name__)


@dataclass
class Event:
    """Progress of the fine-tune, for a command's progress bar."""

    stage: str            # "train" | "val" | "reselect" | "test"
    epoch: int
    epochs: int
    done: int
    total: int
    loss: float = math.nan


@dataclass
class FinetuneResult:
    """What :func:`finetune_run` produced (also on disk in ``path``)."""

    path: Path
    fold: str
    metrics: dict                              # fine-tuned, with a "frozen" block
    model: BagModel = field(repr=False)
    history: dict = field(default_factory=dict)
    selection: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    task: str = "classification"


@dataclass
class _Job:
    """What the epochs and the scoring share: the model, its tiles and the frozen selection."""

    model: BagModel
    tiles: object                              # featstore.read.tilesource.TileSource
    parent: Parent
    coords: dict[str, np.ndarray]
    selection: dict[str, np.ndarray]
    cfg: FinetuneConfig
    report: Callable[[Event], None]
    task: object = None                        # mil.tasks.Task of a survival / regression run; None: classes

    def ticker(self, stage: str, epoch: int, items) -> Callable[[], None]:
        """A per-batch progress callback for embedding *items* ((slide_id, rows) pairs)."""
        total = sum(math.ceil(len(rows) / self.cfg.eval_batch) for _, rows in items)
        done = [0]

        def tick() -> None:
            done[0] += 1
            self.report(Event(stage, epoch, self.cfg.epochs, done[0], total))

        return tick

    def embed(self, items, on_batch: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
        return embed_slides(self.model, self.tiles, items, self.cfg.eval_batch, on_batch)


def _open_tiles(parent: Parent, slides, preprocessing: Mapping, workers: int, pin: bool):
    """The TileSource over the parent's slides; the files must be the ones that were tiled."""
    from featstore.read.tilesource import TileSource

    from featstore.stain import normaliser_of

    try:   # tiles are stain-normalised again as they were for the run's features
        return TileSource.from_store(parent.store, parent.slide_ids, preprocessing, slides=slides,
                                     workers=workers, pin=pin, stain=normaliser_of(parent.run.provenance))
    except FeatstoreError as exc:
        raise MilError(str(exc)) from None


def _preprocessing(parent: Parent, model: BagModel) -> dict:
    """How the run's features were computed (its provenance), completed by the encoder's own."""
    recorded = parent.run.provenance.get("preprocessing") or {}
    return {**model.encoder.preprocessing(), **{k: v for k, v in recorded.items() if v}}


def _stain_augment(tiles, strength: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """HED jitter of normalised training batches (identity at 0): back to uint8 with the tile
    source's mean/std, jittered (after any stain normalisation: the tiles are already normalised),
    scaled again. Draws come from torch's RNG, seeded with the run."""
    from featstore.stain import stain_jitter

    if strength == 0:
        return lambda x: x
    jitter = stain_jitter(strength)

    def apply(x: torch.Tensor) -> torch.Tensor:
        mean, std = tiles.mean.to(x.device), tiles.std.to(x.device)
        rgb = (x * std + mean).round_().clamp_(0, 255).to(torch.uint8)
        return (jitter(rgb).float() - mean) / std

    return apply


def _train_epoch(job: _Job, opt: torch.optim.Optimizer) -> Callable[[int], float]:
    """The epoch function for featstore.core.fit: each training slide's top-k bag once, in a seeded order
    (re-selected from the current model every epoch after the first with ``reselect``)."""
    cfg, model, train_ids = job.cfg, job.model, job.parent.train
    rng = np.random.default_rng([cfg.seed, 6])
    sel = dict(job.selection)
    jitter = _stain_augment(job.tiles, cfg.hed_jitter)

    def train_epoch(epoch: int) -> float:
        if cfg.reselect and epoch > 1:
            items = [(s, job.coords[s]) for s in train_ids]
            _, attn = score_bags(model.head, job.embed(items, job.ticker("reselect", epoch, items)), train_ids)
            sel.update({s: select_topk(attn[s], cfg.k) for s in train_ids})
        order = [train_ids[i] for i in rng.permutation(len(train_ids))]
        model.train_mode()
        opt.zero_grad(set_to_none=True)

        def steps():
            stream = job.tiles.stream([(s, job.coords[s][sel[s]]) for s in order])
            if job.task is not None:
                yield from _task_steps(job, opt, stream, len(order), jitter)
                return
            for step, (sid, x) in enumerate(stream):
                x = jitter(x)
                model.train_mode()
                loss = backward_bag(model, x, job.parent.y[sid], 1.0 / cfg.accumulate)
                if (step + 1) % cfg.accumulate == 0 or step + 1 == len(order):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                yield loss

        return core_fit.mean_loss(steps(), lambda done, mean: job.report(
            Event("train", epoch, cfg.epochs, done, len(order), mean)))

    return train_epoch


def _task_steps(job: _Job, opt: torch.optim.Optimizer, stream, n: int, jitter):
    """Survival / regression: one optimiser step per ``max(accumulate, task.bags_per_step)`` bags,
    on the task's loss over their outputs together (a Cox risk set needs several slides, so
    their graphs are kept until the step; each bag's encoder activations stay checkpointed)."""
    model, task, parent = job.model, job.task, job.parent
    per_step = max(job.cfg.accumulate, task.bags_per_step)
    outs, rows = [], []
    for step, (sid, x) in enumerate(stream):
        model.train_mode()
        out, _ = model(jitter(x))
        outs.append(out.float())
        rows.append(parent.row[sid])
        if len(outs) < per_step and step + 1 < n:
            continue
        loss = task.loss(torch.stack(outs), np.array(rows))
        if loss.requires_grad:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        outs, rows = [], []
        yield float(loss.detach())


def _task_outputs(job: _Job, head, bags, ids: list[str]) -> tuple[np.ndarray, dict]:
    """A survival / regression head on *ids*: the task's prediction (risk, value) and raw attention."""
    raw, attn = bag_outputs(head, bags, ids)
    return job.task.predict(raw), attn


def _evaluate(job: _Job) -> Callable[[int], dict[str, float]] | None:
    """Validation on the val slides' frozen top-k tiles (None without val slides, or when the
    task's loss cannot score them: a Cox loss needs an event)."""
    val_ids = job.parent.val
    if not val_ids:
        return None
    if job.task is not None:
        rows = job.parent.rows(val_ids)
        if not job.task.val_defined(rows):
            log.warning("the %d validation slides cannot score the %s loss (no event among them)", len(val_ids),
                        job.task.name)
            return None

        def evaluate_task(epoch: int) -> dict[str, float]:
            emb = job.embed([(s, job.coords[s][job.selection[s]]) for s in val_ids])
            raw, _ = bag_outputs(job.model.head, emb, val_ids)
            v = job.task.val_loss(torch.as_tensor(raw, dtype=torch.float32), rows)
            job.report(Event("val", epoch, job.cfg.epochs, len(val_ids), len(val_ids), v))
            return {"val_loss": v}

        return evaluate_task
    yv = np.array([job.parent.y[s] for s in val_ids], dtype=np.int64)

    def evaluate(epoch: int) -> dict[str, float]:
        emb = job.embed([(s, job.coords[s][job.selection[s]]) for s in val_ids])
        m = val_metrics(job.model.head, emb, val_ids, yv)
        job.report(Event("val", epoch, job.cfg.epochs, len(val_ids), len(val_ids), m["val_loss"]))
        return m

    return evaluate


def _train(job: _Job) -> core_fit.FitResult:
    """The epochs; the best validation epoch (by loss; ties keep the earlier) is restored."""
    def diverged(epoch: int, loss: float) -> MilError:
        return MilError(f"fine-tuning diverged at epoch {epoch} (loss {loss}); lower --lr/--head-lr")

    def logged(r: core_fit.EpochRecord) -> None:
        if "val_loss" in r.metrics:
            log.info("epoch %d: train %.4f val %.4f auc %.4f", r.epoch, r.train_loss, r.metrics["val_loss"],
                     r.metrics.get("val_auc", math.nan))
        else:
            log.info("epoch %d: train %.4f (no validation slides)", r.epoch, r.train_loss)

    evaluate = _evaluate(job)
    if evaluate is None:
        log.warning("the frozen run's fold holds no validation slides, so no epoch can be chosen: the last of "
                    "--epochs %d is kept (train the run with more slides, or a labels split column with val rows)",
                    job.cfg.epochs)
    opt = make_optimizer(job.model, job.cfg)
    return core_fit.fit(job.model, _train_epoch(job, opt), evaluate, epochs=job.cfg.epochs,
                        monitor="val_loss_only", on_epoch=logged, diverged=diverged)


def _score_test(job: _Job) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """The fine-tuned model on the test slides' tiles (all, or the frozen top-k)."""
    cfg, test = job.cfg, job.parent.test
    items = [(s, job.coords[s] if cfg.eval_tiles == "all" else job.coords[s][job.selection[s]]) for s in test]
    emb = job.embed(items, job.ticker("test", cfg.epochs, items))
    if job.task is not None:
        return _task_outputs(job, job.model.head, emb, test)
    return score_bags(job.model.head, emb, test)


def finetune_run(spec: FinetuneSpec, cfg: FinetuneConfig,
                 progress: Callable[[Event], None] | None = None,
                 on_stage: Callable[[str], None] | None = None) -> FinetuneResult:
    """Parent run -> top-k tiles -> encoder + head trained end to end -> fine-tune run directory."""
    from featstore.encoders import resolve_precision
    from mil.data import load_bags
    from mil.metrics import fold_metrics, summarize

    stage = on_stage or (lambda text: log.info(text))
    device = resolve_device(cfg.device)   # a bad --device fails before any work
    precision = resolve_precision(cfg.precision, device)
    parent = load_parent(spec.run, cfg.fold, spec.store)
    run, st, fold, ids = parent.run, parent.store, parent.fold, parent.slide_ids
    if run.model_config.get("name") == "mean":
        raise MilError(f"run {run.path} uses the mean head, which has no attention to pick top-k tiles; "
                       "fine-tune an abmil, abmil-gated or max run")
    frozen = run.model(fold)
    with deterministic(cfg.seed, device), cpu_threads(cfg.threads):
        model = build_model(parent, cfg, device, precision)
        stage(f"checking {len(ids)} slide files")
        with _open_tiles(parent, spec.slides, _preprocessing(parent, model), cfg.workers,
                         device.type == "cuda") as tiles:
            writer = RunWriter(spec.out, overwrite=spec.overwrite, parent=run.path)   # claims --out
            try:
                stage(f"frozen attention of fold {fold} over {len(ids)} slides ({parent.key})")
                bags = load_bags(st, ids, parent.key, expected_dim=int(run.model_config["in_dim"]))
                job = _Job(model, tiles, parent, {s: st.coords(s) for s in ids},
                           frozen_topk(frozen, bags, ids, cfg.k), cfg, progress or (lambda e: None), parent.task())
                fit = _train(job)
                stage(f"scoring {len(parent.test)} test slides ({cfg.eval_tiles} tiles)")
                ft_probs, ft_attn = _score_test(job)
                cutoff = _risk_cutoff(job) if job.task is not None and job.task.name == "survival" else None
                paths = dict(tiles.paths)
            except BaseException:
                writer.close()
                raise
    with writer:    # released when the run is written, or fails
        if job.task is None:
            frozen_probs, _ = score_bags(frozen, bags, parent.test)
            y_test = np.array([parent.y[s] for s in parent.test], dtype=np.int64)
            ft_m = fold_metrics(y_test, ft_probs, n_boot=cfg.n_boot, seed=cfg.seed)
            fr_m = fold_metrics(y_test, frozen_probs, n_boot=cfg.n_boot, seed=cfg.seed)
            keys = ("auc", "balanced_accuracy", "f1")
        else:
            frozen_probs, _ = _task_outputs(job, frozen, bags, parent.test)
            test_rows = parent.rows(parent.test)
            ft_m = job.task.fold_metrics(test_rows, ft_probs, n_boot=cfg.n_boot, seed=cfg.seed)
            fr_m = job.task.fold_metrics(test_rows, frozen_probs, n_boot=cfg.n_boot, seed=cfg.seed)
            keys = job.task.keys
        metrics = {**summarize({fold: ft_m}, keys), "frozen": summarize({fold: fr_m}, keys)}
        stage(f"writing {writer.path}")
        history = fit.as_dict()
        _write(writer, job, fit.best_epoch, history, metrics, (ft_probs, ft_attn, frozen_probs), precision, paths,
               cutoff)
    return FinetuneResult(writer.path, fold, metrics, model, history, job.selection,
                          "classification" if job.task is None else job.task.name)


def _risk_cutoff(job: _Job) -> float:
    """The fine-tuned model's median risk over its training slides' top-k tiles: where km.png splits
    the test slides into high and low risk (a cut fixed before the test slides are seen)."""
    train = job.parent.train
    emb = job.embed([(s, job.coords[s][job.selection[s]]) for s in train])
    risk, _ = _task_outputs(job, job.model.head, emb, train)
    return float(np.median(risk))


def _write(writer: RunWriter, job: _Job, best_epoch: int, history: dict, metrics: dict, scores: tuple,
           precision: str, paths: Mapping[str, Path], cutoff: float | None = None) -> None:
    """Every file of the fine-tune run: encoder checkpoint, head, metrics, predictions, plots, config."""
    from featstore import __version__ as featstore_version
    from featstore.checkpoint import file_sha256, file_tag, save_encoder

    ft_probs, ft_attn, frozen_probs = scores
    parent, cfg, model = job.parent, job.cfg, job.model
    run, fold, classes = parent.run, parent.fold, list(parent.run.classes)
    model.cpu().eval()
    enc_path = writer.file("encoder.pt")
    ft_info = {"parent_run": str(run.path.resolve()), "fold": fold, "k": cfg.k, "epochs": cfg.epochs,
               "best_epoch": best_epoch, "lr": cfg.lr, "head_lr": cfg.head_lr, "seed": cfg.seed,
               "reselect": cfg.reselect, "train_blocks": cfg.train_blocks,
               "trained_modules": [n for n, _ in model.encoder.trainable_modules(cfg.train_blocks)]}
    save_encoder(model.encoder, enc_path, level=int(run.config["minus"]), extra={"finetune": ft_info})
    enc_sha, enc_tag = file_sha256(enc_path), file_tag(enc_path)
    provenance = {**run.provenance, "weights": enc_tag, "weights_kind": "file",
                  "weights_path": str(enc_path.resolve()), "weights_sha256": enc_sha,
                  "parent_weights": run.provenance.get("weights"),
                  "parent_sha256": run.provenance.get("weights_sha256")}
    writer.models({fold: model.head.state_dict()}, model.head.config, classes, provenance)
    writer.json("metrics.json", metrics)
    task = job.task
    name = "classification" if task is None else task.name
    if task is None:
        rows = lambda probs: [{"slide_id": s, "label": classes[parent.y[s]], "fold": fold, "probs": p}  # noqa: E731
                              for s, p in zip(parent.test, probs)]
    else:
        rows = lambda preds: [{"slide_id": s, "fold": fold, **task.row(parent.row[s], p)}  # noqa: E731
                              for s, p in zip(parent.test, preds)]
    writer.predictions(rows(frozen_probs), classes, "predictions_frozen.csv", task=name)
    writer.predictions(rows(ft_probs), classes, task=name)
    if cfg.eval_tiles == "all":
        writer.attention({(fold, s): a for s, a in ft_attn.items()})
    writer.json("topk.json", {"k": cfg.k, "fold": fold, "rows": {s: job.selection[s].tolist() for s in parent.slide_ids}})
    writer.json("history.json", {fold: history})
    if task is None:
        truth = np.array([parent.y[s] for s in parent.test], dtype=np.int64)
    else:
        truth = parent.labels.target[parent.rows(parent.test)]
    writer.plots({fold: (truth, ft_probs)}, classes, metrics, {fold: history}, task=name,
                 cutoffs=None if cutoff is None else {fold: cutoff})
    key = parent.key
    task_config = {}
    if task is not None:
        task_config = {fold: {**task.config(), **({"risk_cutoff": cutoff} if cutoff is not None else {})}}
    writer.finish({
        "kind": "finetune", "task": name, "task_config": task_config, "parent_run": str(run.path), "encoder": key.encoder, "weights": key.weights,
        "minus": key.minus, "model": run.model_config.get("name"), "seed": cfg.seed, "epochs": cfg.epochs,
        "lr": cfg.lr, "head_lr": cfg.head_lr,
        **{k: v for k, v in cfg.to_dict().items() if k not in ("epochs", "lr", "head_lr", "seed")},
        "fold": fold, "fold_names": [fold], "precision_used": precision,
        "train_fraction": run.config.get("train_fraction", 1.0), "store": parent.store.path,
        "labels": run.config.get("labels"), "classes": classes,
        "n_slides": len(parent.slide_ids), "slides": {s: str(p) for s, p in paths.items()},
        "encoder_checkpoint": str(enc_path), "encoder_sha256": enc_sha, "features_weights": enc_tag,
        "provenance": provenance, "featstore_version": featstore_version,
        "splits": {fold: {"train": parent.train, "val": parent.val, "test": parent.test}},
    })


__all__ = ["FinetuneConfig", "FinetuneSpec", "FinetuneResult", "Event", "Parent", "load_parent",
           "parent_encoder", "BagModel", "build_model", "make_optimizer", "backward_bag", "train_step",
           "embed_slides", "finetune_run"]
