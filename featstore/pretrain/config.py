"""The config of a pretraining run: encoder, method, starting weights, data fractions, schedule.

Each field declares its help (:func:`featstore.core.config.option`); `featstore pretrain` builds its
options from them and the study validates its ``pretrain:`` section against them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from featstore.core.config import Config, option
from featstore.errors import PretrainConfigError, PretrainError


def parse_fractions(text: str) -> tuple[float, ...]:
    """``0.1,0.25,1`` -> (0.1, 0.25, 1.0); each in (0, 1]."""
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise PretrainError(f"--fraction {text!r}: give fractions like 0.1,0.25,0.5,1.0") from None
    return vals


def show_fractions(vals: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in vals)


@dataclass(frozen=True)
class PretrainConfig(Config):
    """Self-supervised pretraining of one encoder on a store's tiles (see docs/pretrain.md)."""

    config_error = PretrainConfigError

    encoder: str = option(help="Encoder name (see `featstore encoders`).", flags=("--encoder", "-e"))
    method: str = option("auto", "mae | simclr | barlowtwins (auto: mae for ViTs, simclr for CNNs).")
    weights: str = option("random", "Starting weights: random | imagenet | a tag | a file (continued pretraining).")
    fractions: tuple[float, ...] = option((1.0,), "Fractions of the store's tiles, e.g. 0.1,0.25,0.5,1.0: one "
                                                  "encoder each, on nested subsets (10 % within 25 % ...).",
                                          flags=("--fraction",), parse=parse_fractions, show=show_fractions,
                                          gt=0, le=1)
    tiles: int | None = option(None, "Train on this many tiles instead of --fraction (balanced across slides).",
                              ge=1)
    epochs: int = option(10, "Passes over each subset's tiles.", ge=1)
    batch_size: int = option(32, "Tiles per step.", ge=2)
    lr: float = option(1.5e-4, "Peak learning rate (AdamW), reached after the warm-up, then cosine decay.")
    weight_decay: float = option(0.05, "AdamW weight decay.")
    warmup: float = option(0.1, "Share of the steps spent warming the learning rate up linearly.")
    mask_ratio: float = option(0.75, "MAE: share of the patches masked (He et al. 2022: 0.75).", gt=0, lt=1)
    decoder_dim: int = option(256, "MAE: decoder width (a light decoder, as in the paper's ablation).")
    decoder_depth: int = option(4, "MAE: decoder blocks.")
    decoder_heads: int = option(8, "MAE: decoder attention heads.")
    temperature: float = option(0.1, "SimCLR: NT-Xent temperature.")
    hed_jitter: float = option(0.0, "Stain augmentation: HED jitter strength (sigma = bias; 0.02-0.05 typical; 0: off).")
    holdout: int = option(8, "Tiles kept out of training: held-out loss and the MAE reconstruction picture.", ge=0)
    checkpoint_every: int = option(50, "Steps between resumable checkpoints (a killed run resumes from the last).",
                                  ge=1)
    seed: int = option(0, "Seed: tile subsets, order, augmentations, masks, random init.")
    precision: str = option("auto", "auto | bf16 | fp16 | fp32 (autocast for the forward pass).")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    workers: int = option(1, "Tile reader threads (the next batch is read while the current one trains).", ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()     # declared choices and bounds
        if not self.fractions:
            raise PretrainError("--fraction is empty: give shares of the tiles, e.g. 0.1,0.25,1")

    def to_dict(self) -> dict:
        """Plain data (JSON, provenance); :meth:`from_dict` reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def subsets(self) -> list[tuple[str, float | None, int | None]]:
        """(output name, fraction, tile count) per encoder to train: ``f0.25`` ... or ``tiles500``."""
        if self.tiles is not None:
            return [(f"tiles{self.tiles}", None, self.tiles)]
        return [(f"f{f:g}", f, None) for f in sorted(set(self.fractions))]


__all__ = ["PretrainConfig", "parse_fractions"]
