"""The config of an extraction: encoder, levels, weights, tiling and the pipeline's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from featstore.errors import FeatstoreError
from featstore.tiling import TilingConfig

@dataclass(frozen=True)
class ExtractConfig:
    """What to extract and how fast: encoder, levels, weights, tiling and the pipeline's knobs."""

    encoder: str
    levels: tuple[int, ...] = (0,)
    weights: str = "random"
    tiling: TilingConfig = field(default_factory=TilingConfig)
    input_size: int | None = None  # None: the encoder's own input size
    batch_size: int = 32
    workers: int = 0  # reader threads; 0 = auto (see Extractor.workers)
    precision: str = "auto"
    device: str = "auto"
    slide_mpp: float | None = None  # override for slides without mpp metadata
    seed: int = 0
    allow_download: bool = False
    strict_weights: bool = True
    tune_malloc: bool = True

    def __post_init__(self) -> None:
        if not self.levels:
            raise FeatstoreError("no truncation level requested (use --minus 0 or e.g. --minus 0,1,2,3)")
        if self.batch_size < 1 or self.workers < 0:
            raise FeatstoreError("--batch-size must be >= 1 and --workers >= 0 (0 = auto)")

