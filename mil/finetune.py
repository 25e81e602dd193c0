"""Top-k end-to-end fine-tuning (HistoTransfer's second stage): `mil finetune`.

From a finished `mil train` run: for every slide take the k tiles with the highest raw attention
of the frozen head, read them straight from the WSI at the store's coords, and train the run's
truncated encoder + its head end to end; then score the fold's test slides with the frozen run
and with the fine-tuned model, side by side, and write the fine-tuned encoder as a
``featstore-encoder/1`` checkpoint that ``featstore extract --weights`` accepts.

Choices (docs/finetune.md explains them):

* one fold per fine-tune run (``fold``, default the run's first): its training slides train,
  its validation slides pick the best epoch, its test slides are scored by both models, so the
  encoder.pt of the run belongs to exactly one head;
* a bag of k tiles is embedded in micro-batches under ``torch.utils.checkpoint``: activations of
  one micro-batch live at a time, and the gradient is exactly that of the whole bag (the head
  needs all k embeddings for its softmax);
* BatchNorm layers stay in eval mode (running statistics frozen; their affine weights train);
* test slides are scored on all their tiles by default (as HistoTransfer; ``eval_tiles="topk"``
  scores the frozen top-k only, cheaper).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from featstore.errors import FeatstoreError
from mil import run as run_files
from mil.config import FinetuneConfig, FinetuneSpec
from mil.errors import LabelsError, MilError, RunError
from mil.run import Run, load_run, write_json
from mil.topk import head_attention, select_topk
from mil.train import cpu_threads, deterministic, mean_nll, resolve_device, safe_auc

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
    model: "BagModel" = field(repr=False)
    history: dict = field(default_factory=dict)
    selection: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------- the parent run
def _parent_weights(run: Run) -> tuple[str, int]:
    """The ``create_encoder`` weights argument (and seed) that rebuild the run's encoder."""
    prov = run.provenance
    tag = str(prov.get("weights") or run.config.get("weights") or "")
    kind = prov.get("weights_kind")
    if kind == "random" or (kind is None and tag.startswith("random")):
        seed = prov.get("seed")
        if seed is None:
            seed = int(tag.rsplit("-s", 1)[1]) if "-s" in tag and tag.rsplit("-s", 1)[1].isdigit() else 0
        return "random", int(seed)
    path = prov.get("weights_path")
    if path:
        if not Path(path).is_file():
            raise RunError(f"run {run.path}: its encoder weights file {path} is gone; put it back (the "
                           "fine-tune starts from the encoder the run's features came from)")
        return (f"{tag}={path}" if kind == "named" else str(path)), 0
    if kind == "named" or tag:
        return tag, 0
    raise RunError(f"{run.path / 'model.pt'}: provenance does not say which encoder weights made the features; "
                   "rerun `mil train` on a store written by `featstore extract`")


def parent_encoder(run: Run):
    """The run's encoder (name, weights, level) rebuilt offline; MilError if its sha256 differs."""
    from featstore.encoders import create_encoder

    name, minus = run.config.get("encoder"), run.config.get("minus")
    if name is None or minus is None:
        raise RunError(f"{run.path / 'config.json'} lacks encoder/minus; rerun `mil train`")
    weights, seed = _parent_weights(run)
    try:
        enc = create_encoder(str(name), weights, levels=(int(minus),), seed=seed)
    except FeatstoreError as exc:
        raise MilError(f"run {run.path}: cannot rebuild encoder {name} ({exc})") from None
    want = run.provenance.get("weights_sha256")
    if want and enc.weights_sha256 and want != enc.weights_sha256:
        raise MilError(f"run {run.path}: weights {weights} have sha256 {enc.weights_sha256[:12]}... but the run's "
                       f"features came from {want[:12]}...; restore the original weights file")
    return enc


@dataclass
class Parent:
    """The frozen run, its store and the fold being fine-tuned."""

    run: Run
    store: object
    key: object
    fold: str
    train: list[str]
    val: list[str]
    test: list[str]
    y: dict[str, int]                   # slide_id -> class index into run.classes

    @property
    def slide_ids(self) -> list[str]:
        return self.train + self.val + self.test


def load_parent(run_dir: str | Path, fold: str | None = None, store: str | None = None) -> Parent:
    """Read the run, its store, labels and the fold's split; one-line errors for every gap."""
    from featstore.errors import StoreError
    from featstore.store import FeatureKey, open_store
    from mil.data import read_labels

    run = load_run(run_dir)
    cfg = run.config
    if cfg.get("kind", "train") != "train":
        raise RunError(f"{run.path} is a {cfg.get('kind')!r} run; fine-tune from a `mil train` run")
    splits = cfg.get("splits") or {}
    if not splits:
        raise RunError(f"{run.path / 'config.json'} has no splits; rerun `mil train` with this version")
    fold = fold or run.folds[0]
    if fold not in splits or fold not in run.states:
        raise MilError(f"run {run.path} has no fold {fold!r}; choose one of {', '.join(run.folds)}")
    if len(run.folds) > 1:
        log.warning("run %s has %d folds; fine-tuning fold %s only (--fold picks another)", run.path,
                    len(run.folds), fold)
    store_path = store or cfg.get("store")
    try:
        st = open_store(store_path)
    except (FeatstoreError, OSError) as exc:
        raise MilError(f"run {run.path}: cannot open its store {store_path} ({exc}); pass --store") from None
    key = FeatureKey(cfg["encoder"], cfg["weights"], int(cfg["minus"]))
    labels = read_labels(cfg["labels"])
    if tuple(labels.classes) != tuple(run.classes):
        raise LabelsError(f"{labels.path}: classes {list(labels.classes)} differ from run {run.path}'s "
                          f"{run.classes}; use the run's labels file")
    y = dict(zip(labels.slide_ids, (int(v) for v in labels.y)))
    sp = splits[fold]
    ids = {part: list(sp.get(part, [])) for part in ("train", "val", "test")}
    need = ids["train"] + ids["val"] + ids["test"]
    unlabeled = [s for s in need if s not in y]
    if unlabeled:
        raise LabelsError(f"{labels.path} lacks slide(s) {', '.join(unlabeled[:10])} of run {run.path}; "
                          "use the run's labels file")
    try:
        missing = [s for s in need if not st.has_features(s, key.encoder, key.minus, key.weights)]
    except StoreError as exc:
        raise MilError(f"{st.path}: {exc}") from None
    if missing:
        raise MilError(f"{st.path} lacks features {key} for slide(s) {', '.join(missing[:10])} of run "
                       f"{run.path}; pass the run's store with --store")
    if not ids["train"]:
        raise MilError(f"run {run.path}: fold {fold} has no training slides")
    return Parent(run, st, key, fold, ids["train"], ids["val"], ids["test"], y)


# ----------------------------------------------------------------------------------- slide files
def resolve_slide_paths(store, slide_ids: Sequence[str], inputs: Sequence[str] | None = None,
                        check_fingerprint: bool = True) -> dict[str, Path]:
    """{slide_id: file} for the store's slides, from *inputs* (as `featstore extract` takes them)
    or else each slide's recorded source; the file must be the one that was tiled."""
    from featstore.cohort import discover_slides
    from featstore.slide import Slide

    if inputs:
        try:
            found = {r.slide_id: r.path for r in discover_slides(list(inputs))}
        except FeatstoreError as exc:
            raise MilError(f"--slides: {exc}") from None
        missing = [s for s in slide_ids if s not in found]
        if missing:
            raise MilError(f"{len(missing)} slide(s) of the store not found among --slides "
                           f"({', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}); pass the "
                           "files, directory or slide_id,path CSV the store was extracted from")
        paths = {s: Path(found[s]) for s in slide_ids}
    else:
        paths = {}
        gone = []
        for s in slide_ids:
            src = store.slide_info(s).get("source")
            if not src or not Path(src).is_file():
                gone.append(f"{s} ({src})")
            else:
                paths[s] = Path(src)
        if gone:
            raise MilError(f"slide file(s) recorded in {store.path} not found: {', '.join(gone[:5])}"
                           f"{' ...' if len(gone) > 5 else ''}; pass --slides with their current location")
    if check_fingerprint:
        for s, p in paths.items():
            info = store.slide_info(s)
            want = info.get("fingerprint")
            if not want:
                continue
            try:
                with Slide(p, mpp=info.get("slide_mpp")) as slide:
                    got = slide.fingerprint()
            except FeatstoreError as exc:
                raise MilError(f"{p}: cannot open slide {s} ({exc})") from None
            if got != want:
                raise MilError(f"{p} differs from the file tiled into {store.path} as {s!r} (size/hash changed); "
                               "pass the original slide with --slides")
    return paths


class TileReader:
    """Reader threads (one OpenSlide handle per thread and slide) producing normalised tile batches.

    ``read(slide_id, coords)`` -> (B, 3, S, S) float32, ``(rgb - 255 mean) / (255 std)``, tiles
    read with ``Slide.read_patch`` exactly as the extractor reads them.
    """

    def __init__(self, paths: Mapping[str, Path], info: Mapping[str, dict], input_size: int, mean, std,
                 workers: int = 2, pin: bool = False):
        from featstore.patches import PatchReader

        self.paths, self.info = dict(paths), dict(info)
        self.input_size = int(input_size)
        self.workers = int(workers)
        self.patches = PatchReader(input_size, mean, std, pin=pin)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ft-reader")

    def _read(self, slide_id: str, coords: np.ndarray) -> np.ndarray:
        return self.patches.read(self.paths[slide_id], coords, int(self.info[slide_id]["size0"]),
                                 self.info[slide_id].get("slide_mpp"))

    def submit(self, slide_id: str, coords: np.ndarray) -> Callable[[], Tensor]:
        """Start reading; returns a function that waits and gives the normalised batch."""
        coords = np.asarray(coords)
        parts = [p for p in np.array_split(coords, min(self.workers, max(1, len(coords)))) if len(p)]
        futures: list[Future] = [self.pool.submit(self._read, slide_id, p) for p in parts]

        def result() -> Tensor:
            rgb = np.concatenate([f.result() for f in futures]) if futures else \
                np.zeros((0, self.input_size, self.input_size, 3), np.uint8)
            return self.patches.normalise(rgb)

        return result

    def read(self, slide_id: str, coords: np.ndarray) -> Tensor:
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

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.patches.close()


# ------------------------------------------------------------------------------------ the model
class BagModel(nn.Module):
    """The truncated encoder in front of the MIL head: tiles (B, 3, S, S) -> (logits, raw attention)."""

    def __init__(self, encoder, head: nn.Module, level: int, precision: str = "fp32",
                 micro_batch: int = 16):
        super().__init__()
        encoder.set_levels((int(level),))
        self.encoder, self.head = encoder, head
        self.level = int(level)
        self.precision = precision
        self.micro_batch = int(micro_batch)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def _embed_chunk(self, x: Tensor) -> Tensor:
        from featstore.encoders import autocast

        with autocast(self.precision, x.device):
            return self.encoder(x)[self.level].float()

    def embed(self, x: Tensor) -> Tensor:
        """(B, D) float32 embeddings, *micro_batch* tiles per forward.

        With gradients on, each micro-batch is checkpointed: its activations are recomputed in
        the backward pass instead of kept, so a bag of any k fits in memory and the gradient is
        exactly that of one forward over the whole bag.
        """
        x = x.to(self.device, non_blocking=self.device.type == "cuda")
        chunks = [x[i:i + self.micro_batch] for i in range(0, len(x), self.micro_batch)]
        if torch.is_grad_enabled() and len(chunks) > 1:
            outs = [checkpoint(self._embed_chunk, c, use_reentrant=False) for c in chunks]
        else:
            outs = [self._embed_chunk(c) for c in chunks]
        return torch.cat(outs) if outs else torch.zeros((0, self.encoder.dims[self.level]), device=self.device)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.head(self.embed(x))

    def train_mode(self) -> "BagModel":
        """Training mode with every BatchNorm kept in eval mode (running statistics frozen)."""
        self.train()
        self.encoder.set_batchnorm_eval()
        return self


def build_model(parent: Parent, cfg: FinetuneConfig, device: torch.device, precision: str) -> BagModel:
    """Parent encoder + the fold's head; only the stages the level runs can receive gradients."""
    from featstore.encoders import prepare_encoder

    enc = parent_encoder(parent.run)
    enc = prepare_encoder(enc, precision, device)
    head = parent.run.model(parent.fold).to(device)
    enc.model.requires_grad_(False)
    for p in enc.trainable_parameters():
        p.requires_grad_(True)
    return BagModel(enc, head, int(parent.run.config["minus"]), precision, cfg.micro_batch)


def make_optimizer(model: BagModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """Adam with two groups: encoder (``lr``) and head (``head_lr``)."""
    groups = [{"params": [p for p in model.encoder.trainable_parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": list(model.head.parameters()), "lr": cfg.head_lr}]
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)


def backward_bag(model: BagModel, x: Tensor, target: int, scale: float = 1.0) -> float:
    """Cross-entropy of one bag, backpropagated (scaled for accumulation); returns the loss."""
    logits, _ = model(x)
    t = torch.tensor([int(target)], device=logits.device)
    loss = nn.functional.cross_entropy(logits.float().unsqueeze(0), t)
    (loss * scale).backward()
    return float(loss.detach())


def train_step(model: BagModel, optimizer: torch.optim.Optimizer, x: Tensor, target: int) -> float:
    """One optimiser step on one bag (BatchNorm statistics untouched)."""
    model.train_mode()
    optimizer.zero_grad(set_to_none=True)
    loss = backward_bag(model, x, target)
    optimizer.step()
    return loss


# ------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def embed_slides(model: BagModel, reader: TileReader, items: Sequence[tuple[str, np.ndarray]],
                 batch: int, on_batch: Callable[[], None] | None = None) -> dict[str, Tensor]:
    """{slide_id: (N, D)} embeddings of the given rows of each slide, read *batch* tiles at a time."""
    model.eval()
    chunks = [(sid, c[i:i + batch]) for sid, c in items for i in range(0, len(c), batch)]
    parts: dict[str, list[Tensor]] = {sid: [] for sid, _ in items}
    for sid, x in reader.stream(chunks):
        parts[sid].append(model.embed(x))
        if on_batch is not None:
            on_batch()
    return {sid: torch.cat(v) for sid, v in parts.items() if v}


@torch.no_grad()
def score_embeddings(head: nn.Module, emb: Mapping[str, Tensor], ids: Sequence[str]
                     ) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """(n, C) probabilities and raw attention per slide of *head* over embeddings."""
    head.eval()
    probs, attn = [], {}
    for s in ids:
        logits, a = head(emb[s])
        probs.append(torch.softmax(logits.float(), -1).cpu().double().numpy())
        attn[s] = None if a is None else a.float().cpu().numpy()
    n_cls = getattr(head, "n_classes", 2)
    return (np.stack(probs) if probs else np.zeros((0, n_cls))), attn


# ----------------------------------------------------------------------------------- the run
def _prepare_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    if out.resolve() == run_dir.resolve():
        raise MilError(f"--out {out} is the parent run itself; choose a new directory, e.g. {run_dir}-ft")
    if out.exists() and not out.is_dir():
        raise MilError(f"--out {out} is a file; choose a directory path")
    if (out / "config.json").exists() and not overwrite:
        raise MilError(f"--out {out} already holds a run; pass --overwrite or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in (*run_files.FILES, "attention.npz", "history.json", "encoder.pt", "topk.json",
                 "predictions_frozen.csv"):
        (out / name).unlink(missing_ok=True)


def finetune_run(spec: FinetuneSpec, cfg: FinetuneConfig,
                 progress: Callable[[Event], None] | None = None,
                 on_stage: Callable[[str], None] | None = None) -> FinetuneResult:
    """Parent run -> top-k tiles -> encoder + head trained end to end -> fine-tune run directory."""
    from featstore.encoders import file_sha256, resolve_precision, save_encoder_checkpoint
    from featstore.encoders.weights import file_tag
    from mil.data import load_bags
    from mil.metrics import fold_metrics, summarize

    from featstore import __version__ as featstore_version

    stage = on_stage or (lambda text: log.info(text))
    report = progress or (lambda e: None)
    out = Path(spec.out)
    parent = load_parent(spec.run, cfg.fold, spec.store)
    run, st, key, fold = parent.run, parent.store, parent.key, parent.fold
    head_name = run.model_config.get("name")
    if head_name == "mean":
        raise MilError(f"run {run.path} uses the mean head, which has no attention to pick top-k tiles; "
                       "fine-tune an abmil, abmil-gated or max run")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    ids = parent.slide_ids
    info = {s: st.slide_info(s) for s in ids}
    stage(f"checking {len(ids)} slide files")
    paths = resolve_slide_paths(st, ids, spec.slides)
    _prepare_out(out, run.path, spec.overwrite)

    stage(f"frozen attention of fold {fold} over {len(ids)} slides ({key})")
    bags = load_bags(st, ids, key, expected_dim=int(run.model_config["in_dim"]))
    frozen = run.model(fold)
    coords = {s: st.coords(s) for s in ids}
    selection = {s: select_topk(head_attention(frozen, bags[s]), cfg.k) for s in ids}
    y = {s: parent.y[s] for s in ids}

    with deterministic(cfg.seed, device), cpu_threads(cfg.threads):
        model = build_model(parent, cfg, device, precision)
        pre = run.provenance.get("preprocessing") or {}
        input_size = int(pre.get("input_size") or model.encoder.input_size)
        reader = TileReader(paths, info, input_size, pre.get("mean") or model.encoder.mean,
                            pre.get("std") or model.encoder.std, cfg.workers, pin=device.type == "cuda")
        try:
            history, best_epoch = _train(model, reader, parent, selection, coords, y, cfg, report)
            stage(f"scoring {len(parent.test)} test slides ({cfg.eval_tiles} tiles)")
            rows = {s: (coords[s] if cfg.eval_tiles == "all" else coords[s][selection[s]]) for s in parent.test}
            n_batches = sum(math.ceil(len(r) / cfg.eval_batch) for r in rows.values())
            done = [0]

            def tick() -> None:
                done[0] += 1
                report(Event("test", cfg.epochs, cfg.epochs, done[0], n_batches))

            emb = embed_slides(model, reader, [(s, rows[s]) for s in parent.test], cfg.eval_batch, tick)
            ft_probs, ft_attn = score_embeddings(model.head, emb, parent.test)
        finally:
            reader.close()
    frozen_probs, frozen_attn = score_embeddings(frozen, {s: bags[s] for s in parent.test}, parent.test)
    y_test = np.array([y[s] for s in parent.test], dtype=np.int64)
    ft_m = fold_metrics(y_test, ft_probs, n_boot=cfg.n_boot, seed=cfg.seed)
    fr_m = fold_metrics(y_test, frozen_probs, n_boot=cfg.n_boot, seed=cfg.seed)
    metrics = {**summarize({fold: ft_m}), "frozen": summarize({fold: fr_m})}

    stage(f"writing {out}")
    classes = list(run.classes)
    model.cpu().eval()
    enc_path = out / "encoder.pt"
    ft_info = {"parent_run": str(run.path.resolve()), "fold": fold, "k": cfg.k, "epochs": cfg.epochs,
               "best_epoch": best_epoch, "lr": cfg.lr, "head_lr": cfg.head_lr, "seed": cfg.seed,
               "reselect": cfg.reselect}
    save_encoder_checkpoint(model.encoder, enc_path, level=int(run.config["minus"]), extra={"finetune": ft_info})
    enc_sha = file_sha256(enc_path)
    provenance = {**run.provenance, "weights": file_tag(enc_path), "weights_kind": "file",
                  "weights_path": str(enc_path.resolve()), "weights_sha256": enc_sha,
                  "parent_weights": run.provenance.get("weights"),
                  "parent_sha256": run.provenance.get("weights_sha256")}
    run_files.save_models(out, {fold: model.head.state_dict()}, model.head.config, classes, provenance)
    write_json(out / "metrics.json", metrics)
    label = lambda s: classes[y[s]]  # noqa: E731
    tmp = run_files.save_predictions(out, [{"slide_id": s, "label": label(s), "fold": fold, "probs": p}
                                           for s, p in zip(parent.test, frozen_probs)], classes)
    shutil.move(tmp, out / "predictions_frozen.csv")
    run_files.save_predictions(out, [{"slide_id": s, "label": label(s), "fold": fold, "probs": p}
                                     for s, p in zip(parent.test, ft_probs)], classes)
    if cfg.eval_tiles == "all":
        run_files.save_attention(out, {(fold, s): a for s, a in ft_attn.items()})
    write_json(out / "topk.json", {"k": cfg.k, "fold": fold, "rows": {s: selection[s].tolist() for s in ids}})
    write_json(out / "history.json", {fold: history})
    run_files.plot_roc(out, {fold: (y_test, ft_probs)}, classes, metrics)
    run_files.plot_curves(out, {fold: history})
    config = {
        "kind": "finetune", "parent_run": str(run.path), "encoder": key.encoder, "weights": key.weights,
        "minus": key.minus, "model": head_name, "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
        "head_lr": cfg.head_lr, **{k: v for k, v in cfg.to_dict().items() if k not in ("epochs", "lr", "head_lr",
                                                                                      "seed")},
        "fold": fold, "fold_names": [fold], "precision_used": precision,
        "train_fraction": run.config.get("train_fraction", 1.0), "store": st.path,
        "labels": run.config.get("labels"), "classes": classes,
        "n_slides": len(ids), "slides": {s: str(p) for s, p in paths.items()},
        "encoder_checkpoint": str(enc_path), "encoder_sha256": enc_sha, "features_weights": file_tag(enc_path),
        "provenance": provenance, "featstore_version": featstore_version,
        "splits": {fold: {"train": parent.train, "val": parent.val, "test": parent.test}},
    }
    write_json(out / "config.json", config)  # last: marks a finished run
    return FinetuneResult(out, fold, metrics, model, history, selection)


def _train(model: BagModel, reader: TileReader, parent: Parent, selection: dict[str, np.ndarray],
           coords: Mapping[str, np.ndarray], y: Mapping[str, int], cfg: FinetuneConfig,
           report: Callable[[Event], None]) -> tuple[dict, int]:
    """The epochs: top-k bags of the training slides, validation on the val slides' top-k tiles;
    restores the best validation epoch (by loss). Returns (history dict, best epoch)."""
    opt = make_optimizer(model, cfg)
    rng = np.random.default_rng([cfg.seed, 6])
    train_ids, val_ids = parent.train, parent.val
    sel = dict(selection)
    hist: dict = {"epoch": [], "train_loss": [], "val_loss": [], "val_auc": [], "best_epoch": 0}
    best_loss, best_state = math.inf, None
    for epoch in range(1, cfg.epochs + 1):
        if cfg.reselect and epoch > 1:
            n = sum(math.ceil(len(coords[s]) / cfg.eval_batch) for s in train_ids)
            done = [0]

            def tick() -> None:
                done[0] += 1
                report(Event("reselect", epoch, cfg.epochs, done[0], n))

            emb = embed_slides(model, reader, [(s, coords[s]) for s in train_ids], cfg.eval_batch, tick)
            _, attn = score_embeddings(model.head, emb, train_ids)
            sel.update({s: select_topk(attn[s], cfg.k) for s in train_ids})
        order = [train_ids[i] for i in rng.permutation(len(train_ids))]
        model.train_mode()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for step, (sid, x) in enumerate(reader.stream([(s, coords[s][sel[s]]) for s in order])):
            model.train_mode()
            total += backward_bag(model, x, y[sid], 1.0 / cfg.accumulate)
            if (step + 1) % cfg.accumulate == 0 or step + 1 == len(order):
                opt.step()
                opt.zero_grad(set_to_none=True)
            report(Event("train", epoch, cfg.epochs, step + 1, len(order), total / (step + 1)))
        train_loss = total / len(order)
        if not math.isfinite(train_loss):
            raise MilError(f"fine-tuning diverged at epoch {epoch} (loss {train_loss}); lower --lr/--head-lr")
        val_loss = val_auc = math.nan
        if val_ids:
            emb = embed_slides(model, reader, [(s, coords[s][selection[s]]) for s in val_ids],
                               cfg.eval_batch)
            probs, _ = score_embeddings(model.head, emb, val_ids)
            yv = np.array([y[s] for s in val_ids], dtype=np.int64)
            val_loss, val_auc = mean_nll(probs, yv), safe_auc(yv, probs)
            report(Event("val", epoch, cfg.epochs, len(val_ids), len(val_ids), val_loss))
        score = val_loss if val_ids else -epoch
        if best_state is None or score < best_loss:
            best_loss, hist["best_epoch"] = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        for k_, v in (("epoch", epoch), ("train_loss", train_loss), ("val_loss", val_loss), ("val_auc", val_auc)):
            hist[k_].append(None if isinstance(v, float) and not math.isfinite(v) else v)
        log.info("epoch %d: train %.4f val %.4f auc %.4f", epoch, train_loss, val_loss, val_auc)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return hist, int(hist["best_epoch"])


__all__ = ["FinetuneConfig", "FinetuneSpec", "FinetuneResult", "Event", "Parent", "load_parent",
           "parent_encoder", "resolve_slide_paths", "TileReader", "BagModel", "build_model", "make_optimizer",
           "backward_bag", "train_step", "embed_slides", "score_embeddings", "finetune_run"]
