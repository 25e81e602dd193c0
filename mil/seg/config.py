"""The declared configs of segmentation (`mil seg train`, whole-slide datasets).

Apart from the training code so that building the CLI's options imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from featstore.core.config import Config, option
from mil.seg.errors import SegConfigError, SegError


@dataclass(frozen=True)
class SegConfig(Config):
    """One segmentation run (`mil seg train`; docs/segmentation.md)."""

    config_error = SegConfigError

    encoder: str = option(help="Encoder name (see `featstore encoders`; CNNs).", flags=("--encoder", "-e"))
    weights: str = option("random", "Encoder weights: random | imagenet | a tag | a file (pretrain, fine-tuned).")
    arch: str = option("unet", "unet | unetplusplus (segmentation_models_pytorch decoders).")
    mask_kind: str = option("instance", "binary | multiclass | instance (instance masks train on foreground).")
    classes: int = option(2, "Classes including background (binary and instance masks: 2).", ge=2)
    fraction: float = option(1.0, "Share of the training images (nested across fractions for a seed).", gt=0, le=1)
    val: float = option(0.2, "Share of the images for validation (early stopping).", ge=0, lt=1)
    test: float = option(0.2, "Share of the images held out for the in-domain test.", gt=0, lt=1)
    epochs: int = option(30, "Maximum epochs (the lowest validation loss is kept).", ge=1)
    patience: int = option(8, "Early stopping: epochs without a lower validation loss (0: never).", ge=0)
    batch_size: int = option(8, "Crops per step.", ge=1)
    crop: int = option(256, "Training crop side in px (images smaller than it are padded).", ge=32)
    lr: float = option(1e-3, "Decoder learning rate (AdamW).")
    encoder_lr: float = option(1e-4, "Encoder learning rate (AdamW; 0 freezes the encoder).")
    augment: bool = option(True, "Flips, 90° rotations (image and mask), colour jitter (image).")
    hed_jitter: float = option(0.0, "Stain augmentation: HED jitter strength (sigma = bias; 0.02-0.05 typical; 0: off).")
    seed: int = option(0, "Seed: split, subset, decoder init, augmentations, batch order.")
    n_boot: int = option(1000, "Bootstrap resamples (over images) for the metrics' CIs.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    threads: int = option(0, "CPU threads for torch (0: torch's default).")


@dataclass(frozen=True)
class WsiSource(Config):
    """Whole slides with annotations as a segmentation dataset (docs/segmentation.md,
    "Whole-slide datasets"): patches of ``patch`` px at ``mpp``."""

    config_error = SegError

    slides: str | None = option(None, "Folder of slides (any OpenSlide format) paired by name with "
                                      "X.geojson / X.json (QuPath) or a label TIFF X.tif.")
    annotations: str | None = option(None, "Folder of the annotation files (default: the slides' folder).")
    mpp: float = option(1.0, "Patch resolution in µm/px (0.5 ~ 20x, 1.0 ~ 10x).")
    patch: int = option(256, "Patch side in px at --mpp.")
    stride: int | None = option(None, "Grid step in px at --mpp (default: --patch).")
    min_annotated: float = option(0.05, "Keep a patch when at least this share of its pixels is annotated.")
    max_patches: int | None = option(None, "At most this many patches per slide (seeded subsample).")
    class_names: str | None = option(None, "GeoJSON class names in id order, comma-separated (ids 1..n; "
                                           "others not drawn). Default: every name, sorted.")
    default_class: str | None = option(None, "Class of unclassified GeoJSON objects (default: skip them).")
    slide_mpp: float | None = option(None, "Override the slides' µm/px (files without it).")

    def class_map(self) -> dict[str, int] | None:
        names = [n.strip() for n in (self.class_names or "").split(",") if n.strip()]
        return {n: i for i, n in enumerate(names, start=1)} or None


def _mask_names():
    from featstore.masks import mask_names

    return mask_names()


@dataclass(frozen=True)
class SlidePredictConfig(Config):
    """Whole slides segmented by a trained run (`mil seg predict-slides`; docs/segmentation.md,
    "Segmenting whole slides"): windows of ``window`` px at ``mpp`` with ``margin`` px of context."""

    config_error = SegConfigError

    mpp: float | None = option(None, "µm/px to segment at (default: the run's own, recorded by `mil seg train "
                                     "--slides`; a run trained on image folders needs it).", gt=0)
    window: int = option(512, "Window side in px at --mpp, predicted at once.", ge=32)
    margin: int = option(32, "Context in px read around each window on every side and then discarded, so window "
                             "edges do not show.", ge=0)
    max_side: int = option(4096, "Longer side of each slide's class map in px (the map is coarser than --mpp "
                                 "where the slide is larger).", ge=64)
    mask: str = option("robust", "Tissue mask (featstore.masks): windows without tissue are not segmented and "
                                 "stay class 0.", flags=("--mask", "--tissue"), choices=_mask_names)
    mask_weights: str = option("", "Weights file of a deep --mask (grandqc, hest).")
    slide_mpp: float | None = option(None, "Override every slide's level-0 µm/px (files without it).", gt=0)
    geojson: bool = option(False, "Also write <slide_id>.geojson: each class's regions as QuPath annotations.")
    batch_size: int = option(4, "Windows per forward pass.", ge=1)
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
