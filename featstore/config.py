"""The config of an extraction: encoder, levels, weights, tiling and the pipeline's knobs.

Each field declares its help text (:func:`featstore.core.config.option`), from which `featstore extract`
builds its options and the study validates its ``extract:`` section.
"""

from __future__ import annotations

from dataclasses import dataclass

from featstore.core.config import Config, option
from featstore.errors import FeatstoreConfigError, FeatstoreError
from featstore.tiling import TilingConfig


def _readers() -> tuple[str, ...]:
    from featstore.read.native import READERS

    return tuple(READERS)


def _stains() -> tuple[str, ...]:
    from featstore.tags import STAIN_METHODS

    return ("none", *STAIN_METHODS)


@dataclass(frozen=True)
class ExtractConfig(Config):
    """What to extract and how fast: encoder, levels, weights, tiling and the pipeline's knobs."""

    config_error = FeatstoreConfigError

    encoder: str = option(help="Encoder name (see `featstore encoders`).", flags=("--encoder", "-e"))
    levels: tuple[int, ...] = option((0,), "Truncation level(s): 1, or 0,1,2,3, or all. One forward pass for all.",
                                     flags=("--minus", "-m"))
    weights: str = option("random", "random | imagenet | a paper tag | path to .pth/.pt/.bin/.safetensors or a "
                                    "fine-tuned encoder.pt.")
    tiling: TilingConfig = option(default_factory=TilingConfig, help="How slides are cut into patches.", cli=False)
    input_size: int | None = option(None, "Encoder input side in px (default: the encoder's, e.g. 224).",
                                    flags=("--resize",))
    batch_size: int = option(32, "Tiles per forward pass.", ge=1)
    workers: int = option(0, "Reader threads, one OpenSlide handle each (0 = auto: 1 on CPU, where readers compete "
                             "with the encoder for cores; up to 8 with CUDA).", ge=0)
    precision: str = option("auto", "auto | bf16 | fp16 | fp32 (auto: fp16 on CUDA, bf16 on CPUs with native bf16, "
                                    "else fp32).")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    reader: str = option("auto", "Patch reader: auto | native | openslide (auto: the slide's own JPEG tiles, decoded "
                                 "in batches, where the file is a tiled JPEG TIFF/SVS; OpenSlide otherwise).",
                        choices=_readers)
    slide_mpp: float | None = option(None, "Microns per pixel of slides whose files do not record it.")
    stain: str = option("none", "Stain normalisation of every tile before the encoder: none | macenko | reinhard "
                                "(features keyed <weights>-stain-<method>-<hash>, beside the raw ones).",
                        choices=_stains)
    stain_reference: str | None = option(None, "Reference for --stain: a tile image, or a slide whose tissue "
                                               "tiles are sampled.")
    stain_tiles: int = option(32, "Tissue tiles sampled from a reference slide for --stain.", ge=1)
    seed: int = option(0, "Seed for random weights.")
    allow_download: bool = option(False, "Allow fetching weights from the internet (off: offline caches only).")
    strict_weights: bool = option(True, "Refuse weights files with missing/unexpected keys.")
    tune_malloc: bool = option(True, "Keep glibc from returning activation buffers to the OS after every batch "
                                     "(faster on CPU, higher peak memory).", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()     # declared choices and bounds
        if not self.levels:
            raise FeatstoreError("no truncation level requested (use --minus 0 or e.g. --minus 0,1,2,3)")
        if self.stain != "none" and not self.stain_reference:
            raise FeatstoreError(f"--stain {self.stain} needs --stain-reference (a reference tile image or a slide)")
        if self.slide_mpp is not None:
            from featstore.read.slide import MPP_RANGE, plausible_mpp

            if not plausible_mpp(self.slide_mpp):
                raise FeatstoreError(f"--slide-mpp {self.slide_mpp:g}: give the slides' level-0 microns per pixel, "
                                     f"a number in {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} (e.g. 0.25 for 40x, 0.5 for 20x)")
