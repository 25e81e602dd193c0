"""The configs of mil's commands: what a `mil train` / `mil finetune` run does and where.

One declaration per setting: each dataclass field is the single source of its default and its
help text, from which the commands build their options and the study validates its YAML.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Sequence

import torch

from mil.errors import MilError

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


_MONITORS = ("val_loss", "val_auc")


@dataclass
class TrainConfig:
    """Hyper-parameters of one MIL fit (one bag per optimiser step)."""

    model: str = "abmil"
    hidden: tuple[int, ...] = (256, 64)
    attn_dim: int = 32
    dropout: float = 0.25
    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-5
    optimizer: str = "adam"
    patience: int = 10            # epochs without val improvement before stopping; 0 = never stop
    monitor: str = "val_loss"     # or "val_auc" (falls back to loss when AUC is undefined)
    seed: int = 0
    device: str = "cpu"
    val_fraction: float = 0.2     # share of training patients carved out for early stopping
    threads: int = 1              # torch CPU threads during the fit (a small head is fastest on 1); 0 keeps torch's

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.optimizer not in _OPTIMIZERS:
            raise MilError(f"optimizer {self.optimizer!r}: choose {', '.join(_OPTIMIZERS)}")
        if self.monitor not in _MONITORS:
            raise MilError(f"monitor {self.monitor!r}: choose {', '.join(_MONITORS)}")
        if self.epochs < 1 or self.lr <= 0 or self.weight_decay < 0 or self.patience < 0:
            raise MilError(f"need epochs >= 1, lr > 0, weight_decay >= 0, patience >= 0 "
                           f"(got {self.epochs}, {self.lr}, {self.weight_decay}, {self.patience})")

    def widths(self) -> dict:
        """Keyword widths for create_mil_model."""
        return {"hidden": self.hidden, "attn_dim": self.attn_dim, "dropout": self.dropout}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RunSpec:
    """Where a run's data comes from and where it goes (the non-hyper-parameter options)."""

    store: str
    labels: str
    out: str
    encoder: str
    minus: int
    weights: str | None = None
    folds: int | None = None          # K-fold CV; None: the labels' split/fold column or one hold-out
    train_fraction: float = 1.0
    allow_missing: bool = False
    cache: str = "auto"               # auto | float32 | float16 | none
    n_boot: int = 1000                # bootstrap resamples for auc_ci
    overwrite: bool = False


EVAL_TILES = ("all", "topk")


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one top-k fine-tune."""

    k: int = 64                    # tiles per slide (highest raw attention)
    epochs: int = 3
    lr: float = 1e-5               # encoder learning rate
    head_lr: float = 1e-4          # head learning rate
    weight_decay: float = 1e-5
    micro_batch: int = 16          # tiles per encoder forward (activation memory)
    accumulate: int = 1            # bags per optimiser step
    reselect: bool = False         # recompute top-k from the current model every epoch
    eval_tiles: str = "all"        # score test slides on "all" tiles or the frozen "topk"
    eval_batch: int = 64           # tiles per forward when scoring (no gradient)
    fold: str | None = None        # fold of the parent run; None = its first
    precision: str = "auto"        # auto | fp32 | bf16 | fp16
    device: str = "cpu"
    workers: int = 2               # tile reader threads
    seed: int = 0
    n_boot: int = 1000
    threads: int = 0               # torch CPU threads; 0 keeps torch's setting

    def __post_init__(self) -> None:
        if self.k < 1 or self.epochs < 1 or self.micro_batch < 1 or self.accumulate < 1 or self.eval_batch < 1:
            raise MilError(f"need --k, --epochs, --micro-batch, --accumulate, --eval-batch >= 1 (got {self.k}, "
                           f"{self.epochs}, {self.micro_batch}, {self.accumulate}, {self.eval_batch})")
        if self.lr < 0 or self.head_lr < 0 or self.weight_decay < 0:
            raise MilError(f"need --lr, --head-lr, --weight-decay >= 0 (got {self.lr}, {self.head_lr}, "
                           f"{self.weight_decay})")
        if self.eval_tiles not in EVAL_TILES:
            raise MilError(f"--eval-tiles {self.eval_tiles!r}: choose {' or '.join(EVAL_TILES)}")
        if self.workers < 1:
            raise MilError(f"--workers {self.workers} must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneSpec:
    """Where the fine-tune reads from and writes to."""

    run: str                                   # the frozen `mil train` run directory
    out: str
    slides: Sequence[str] | None = None        # files / dirs / globs / slide_id,path CSV; None: store sources
    store: str | None = None                   # default: the run's store
    overwrite: bool = False

