"""The configs of mil's commands: what a `mil train` / `mil finetune` run does and where.

One declaration per setting: each dataclass field is the single source of its default and its
help text, from which the commands build their options and the study validates its YAML.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from featstore.core.config import Config, option
from featstore.core.labels import LEVELS
from mil.errors import MilConfigError, MilError


class _Optimizers(Mapping):
    """Optimiser name -> torch.optim class, imported on first use (the CLI starts without torch)."""

    _NAMES = {"adam": "Adam", "adamw": "AdamW"}

    def __getitem__(self, name: str) -> Any:
        import torch

        return getattr(torch.optim, self._NAMES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


_OPTIMIZERS = _Optimizers()


_MONITORS = ("val_loss", "val_auc")


def parse_widths(text: str) -> tuple[int, ...]:
    """``--hidden 256,64`` -> (256, 64): the instance MLP widths as comma-separated integers."""
    try:
        out = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise MilError(f"--hidden {text!r}: give comma-separated integers, e.g. 256,64") from None
    if not out:
        raise MilError("--hidden is empty: give comma-separated integers, e.g. 256,64")
    return out


def _show_widths(widths: Sequence[int]) -> str:
    return ",".join(str(w) for w in widths)


@dataclass
class TrainConfig(Config):
    """Hyper-parameters of one MIL fit (one bag per optimiser step)."""

    config_error = MilConfigError

    model: str = option("abmil", "abmil | abmil-gated | mean | max.")
    hidden: tuple[int, ...] = option((256, 64), "Instance MLP widths, comma-separated (CLAM-like: 512).",
                                     parse=parse_widths, show=_show_widths)
    attn_dim: int = option(32, "Attention width (CLAM-like: 256).")
    dropout: float = option(0.25, "Dropout after each MLP layer.")
    epochs: int = option(50, "Maximum epochs per fold.", ge=1)
    lr: float = option(2e-4, "Learning rate.", gt=0)
    weight_decay: float = option(1e-5, "Weight decay.", ge=0)
    optimizer: str = option("adam", "adam | adamw.", choices=_OPTIMIZERS)
    patience: int = option(10, "Early stopping: epochs without validation improvement (0 = off).", ge=0)
    monitor: str = option("val_loss", "Early-stopping criterion: val_loss | val_auc.", choices=_MONITORS)
    seed: int = option(0, "Seed for splits, init, order; same seed -> same run on CPU.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N (auto: CUDA when present, else the CPU).")
    val_fraction: float = option(0.2, "Share of training patients held out for early stopping.")
    threads: int = option(0, "CPU threads for torch (0: auto, which is 1 here: a MIL head trains fastest on "
                             "one thread).", ge=0)
    survival_loss: str = option("cox", "Survival loss: cox (partial likelihood over --cox-batch slides per step) "
                                       "| nll (discrete-time hazards over --time-bins bins).",
                                choices=("cox", "nll"))
    time_bins: int = option(4, "Survival with --survival-loss nll: time bins (quantiles of the training event "
                               "times).", ge=1)
    cox_batch: int = option(16, "Survival with --survival-loss cox: slides per optimiser step (a Cox risk set "
                                "needs several).", ge=2)

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        super().__post_init__()     # declared choices and bounds

    def widths(self) -> dict:
        """Keyword widths for create_mil_model."""
        return {"hidden": self.hidden, "attn_dim": self.attn_dim, "dropout": self.dropout}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


@dataclass
class RunSpec(Config):
    """Where a run's data comes from and where it goes (the non-hyper-parameter options)."""

    store: str = option(help="Feature store (path or fsspec URL) made by `featstore extract`.")
    labels: str = option(help="CSV slide_id,label[,patient_id][,site][,split|fold]; survival: slide_id,time,"
                              "event[,...]; regression: a numeric label.")
    out: str = option(help="Run directory to write, e.g. runs/densenet121-m1.")
    encoder: str = option(help="Encoder whose features to use, e.g. densenet121.")
    minus: int = option(0, "Truncation level K (features of stage last-K).")
    task: str = option("auto", "classification | survival | regression | auto (survival with time,event "
                               "columns, regression for a non-integer numeric label, else classification).",
                       choices=("auto", "classification", "survival", "regression"))
    targets: list[str] | None = option(None, "Multi-target: label columns of the labels CSV (comma-"
                                             "separate), one run each in OUT/<column>/, each task read from its "
                                             "column; slides without a value are left out of that target.",
                                       parse=lambda v: [c for c in str(v).split(",") if c])
    target: str = option("label", "The label column this run reads (set per target by --targets).", cli=False)
    level: str = option("slide", "The unit a head learns and is scored on: slide, or patient (a patient's "
                                 "slides pooled into one bag; needs a patient_id column). Slide runs also "
                                 "report patient metrics from the mean of each patient's slide scores.",
                        choices=LEVELS)
    weights: str | None = option(None, "Weights tag; needed only if the store holds several.")
    folds: int | None = option(None, "K-fold CV (patient-grouped, stratified). Default: the labels' split/fold "
                                     "column, else one 80/20 hold-out.")
    split: str = option("patient", "How folds are made: patient (grouped by patient, stratified) | site "
                                   "(leave-one-site-out) | site-preserved (each site in one of --folds K "
                                   "folds, default 3, classes balanced). site modes need a 'site' column.")
    train_fraction: float = option(1.0, "Use this share of the training patients (stratified), for data-size "
                                        "studies.")
    allow_missing: bool = option(False, "Skip labelled slides the store lacks (with a warning).")
    cache: str = option("auto", "Bags in memory: auto | float32 | float16 | none (stream).")
    n_boot: int = option(1000, "Bootstrap resamples for the AUC confidence interval.", cli=False)
    overwrite: bool = option(False, "Replace an existing run in --out.")


EVAL_TILES = ("all", "topk")


@dataclass
class FinetuneConfig(Config):
    """Hyper-parameters of one top-k fine-tune."""

    config_error = MilConfigError

    k: int = option(64, "Tiles per slide: the k highest raw attention of the frozen run.", flags=("--k",), ge=1)
    epochs: int = option(3, "Fine-tuning epochs (the best validation epoch is kept).", ge=1)
    lr: float = option(1e-5, "Encoder learning rate.", ge=0)
    head_lr: float = option(1e-4, "Head learning rate.", ge=0)
    weight_decay: float = option(1e-5, "Adam weight decay.", ge=0)
    micro_batch: int = option(16, "Tiles per encoder forward while training (activation memory).", ge=1)
    train_blocks: int = option(0, "Train only the last N blocks the level runs (ViT: plus the final norm; "
                                  "CNN: the last N stages); 0 = all of them, embedding included.", ge=0)
    accumulate: int = option(1, "Slides (bags) per optimiser step.", ge=1)
    hed_jitter: float = option(0.0, "Stain augmentation of the training tiles: HED jitter strength "
                                    "(sigma = bias; 0.02-0.05 typical; 0: off).")
    reselect: bool = option(False, "Recompute each training slide's top-k from the current model every epoch "
                                   "(embeds all its tiles).")
    eval_tiles: str = option("all", "Score test slides on 'all' their tiles or the frozen 'topk'.", choices=EVAL_TILES)
    eval_batch: int = option(64, "Tiles per forward when scoring.", ge=1)
    fold: str | None = option(None, "Fold of the run to fine-tune (default: its first; one fold per fine-tune "
                                    "run).")
    precision: str = option("auto", "auto | fp32 | bf16 | fp16 (auto: bf16 on capable CPUs, fp16 on CUDA).")
    device: str = option("auto", "auto | cpu | cuda | cuda:N (auto: CUDA when present, else the CPU).")
    workers: int = option(2, "Tile reader threads.", ge=1)
    seed: int = option(0, "Seed for bag order and dropout; same seed -> same run on CPU.")
    n_boot: int = option(1000, "Bootstrap resamples for the AUC confidence interval.", cli=False)
    threads: int = option(0, "CPU threads for torch (0: torch's default).", ge=0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneSpec(Config):
    """Where the fine-tune reads from and writes to."""

    run: str = option(help="Frozen run directory written by `mil train`.")
    out: str = option(help="Fine-tune run directory to write, e.g. runs/NAME-ft.")
    slides: Sequence[str] | None = option(
        None, "Slide files, directories, globs or a slide_id,path CSV (as given to `featstore extract`). "
              "Default: the source paths recorded in the store.")
    store: str | None = option(None, "Feature store (default: the run's).")
    overwrite: bool = option(False, "Replace an existing run in --out.")
