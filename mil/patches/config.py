"""The config of a patch-classification study: which features, which classifier, which subsets.

One declaration per setting (:func:`featstore.core.config.option`): `mil patches probe|finetune` build
their options from these fields and the study validates its ``tasks: patch`` section with them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from featstore.core.config import Config, option
from mil.patches.errors import PatchConfigError, PatchError

PROBES = ("logreg", "knn")
METHODS = (*PROBES, "finetune")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(sorted({int(v) for v in str(text).replace(" ", "").split(",") if v}))
    except ValueError:
        raise PatchError(f"{what} {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not vals:
        raise PatchError(f"{what} is empty: give comma-separated integers, e.g. 0,1,2")
    return vals


def parse_levels(text: str) -> tuple[int, ...]:
    """``--minus 0,1,2`` -> (0, 1, 2)."""
    return _ints(text, "--minus")


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2`` -> (0, 1, 2)."""
    return _ints(text, "--seeds")


def parse_fractions(text: str) -> tuple[float, ...]:
    """``--train-fraction 0.01,0.1,1`` -> (0.01, 0.1, 1.0)."""
    try:
        vals = tuple(sorted({float(v) for v in str(text).replace(" ", "").split(",") if v}))
    except ValueError:
        raise PatchError(f"--train-fraction {text!r}: give fractions like 0.01,0.1,0.25,1.0") from None
    return vals


def _show(vals) -> str:
    return ",".join(f"{v:g}" for v in vals)


@dataclass(frozen=True)
class PatchConfig(Config):
    """A patch-classification study over an image store (see docs/patches.md)."""

    config_error = PatchConfigError

    encoder: str = option(help="Encoder whose features (or weights) to use.", flags=("--encoder", "-e"))
    levels: tuple[int, ...] = option((0,), "Truncation levels, comma-separated (--minus 0,1,2).",
                                     flags=("--minus",), parse=parse_levels, show=_show)
    weights: str | None = option(None, "Weights tag (or file) of the stored features; needed when several are "
                                       "stored. Fine-tuning starts from these weights.")
    method: str = option("logreg", "logreg | knn (probes on stored features) | finetune (end to end).",
                         choices=METHODS)
    fractions: tuple[float, ...] = option((1.0,), "Shares of the training split, nested (1 % within 10 % ...).",
                                          flags=("--train-fraction",), parse=parse_fractions, show=_show,
                                          gt=0, le=1)
    seeds: tuple[int, ...] = option((0,), "Seeds, comma-separated: each draws its own subsets and init.",
                                    parse=parse_seeds, show=_show)
    split_seed: int = option(0, "Seed of the train/val/test split (one split for every seed, so inits compare "
                                "on the same test images).")
    val: float = option(0.15, "Share of patches held out for validation (C/k sweep, early stopping, temperature).")
    test: float = option(0.2, "Share of patches held out for testing (when the images carry no split column).")
    temperature: bool = option(True, "Fit temperature scaling on the validation split; report before/after.")
    n_bins: int = option(15, "Confidence bins of the expected calibration error and the reliability diagram.",
                         ge=1)
    n_boot: int = option(1000, "Bootstrap resamples for the metrics' 95 % CIs (0: none).", ge=0)
    keep_encoder: bool = option(False, "finetune: keep each run's fine-tuned encoder.pt (loads with --weights).")

    def __post_init__(self) -> None:
        super().__post_init__()     # declared choices and bounds
        if not self.fractions:
            raise PatchError("--train-fraction is empty: give shares of the training split, e.g. 0.01,0.1,1")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


__all__ = ["PatchConfig", "METHODS", "PROBES", "parse_fractions", "parse_levels", "parse_seeds"]


@dataclass(frozen=True)
class FinetuneSettings(Config):
    """How the encoder + head are fine-tuned (`mil patches finetune`)."""

    config_error = PatchConfigError

    epochs: int = option(10, "Maximum epochs (the best validation epoch is kept).", ge=1)
    patience: int = option(3, "Early stopping: epochs without a lower validation loss (0: never stop).", ge=0)
    batch_size: int = option(32, "Images per step.", ge=1)
    lr: float = option(1e-4, "Encoder learning rate.")
    head_lr: float = option(1e-3, "Linear head learning rate.")
    weight_decay: float = option(1e-4, "Weight decay.")
    optimizer: str = option("adamw", "adamw | sgd (momentum 0.9; LP-FT's choice with --head-init probe).",
                            choices=("adamw", "sgd"))
    train_blocks: int = option(0, "Fine-tune only the last N blocks/stages of the truncated encoder (0: all).", ge=0)
    augment: bool = option(True, "Flips, 90° rotations and mild colour jitter on training images.")
    hed_jitter: float = option(0.0, "Stain augmentation: HED jitter strength (sigma = bias; 0.02-0.05 typical; 0: off).")
    head_init: str = option("random", "random | probe: start the head from the logistic-regression probe on the "
                                      "stored features (LP-FT, Kumar et al. 2022; use with --freeze-bn).",
                            choices=("random", "probe"))
    freeze_bn: bool = option(False, "Keep BatchNorm statistics fixed (eval mode) instead of training them.")
    precision: str = option("auto", "auto | bf16 | fp16 | fp32 (autocast for the forward pass).")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    workers: int = option(2, "Image reader threads.")
    threads: int = option(0, "CPU threads for torch (0: torch's default).")

    def __post_init__(self) -> None:
        super().__post_init__()     # declared choices and bounds
