"""featstore: whole-slide images -> tissue tiles -> encoder embeddings in chunked Zarr stores.

The public API other packages (mil, analysis, study, seg, pretraining) and notebooks may use is
re-exported here; docs/architecture.md lists it with who may import what. Names resolve lazily
(PEP 562), so ``import featstore`` and the store's read API stay free of torch and timm.

=================  =========================================================================
reading stores     open_store, StoreReader, FeatureKey
writing stores     open_store_writer, StoreWriter (the extractor and the h5 importer only)
slides and tiles   Slide, TilingConfig, Tiles, tile_slide, discover_slides, SlideRef
tile source        TileSource (patches at stored coords, path resolution, fingerprint check)
encoders           create_encoder, list_encoders, get_spec, parse_levels, Encoder
weights tags       WeightsTag (owns ``random-s<seed>``, ``file-<stem>-<sha8>``, named tags)
checkpoints        save_encoder, read_encoder_checkpoint, file_sha256, file_tag
extraction         ExtractConfig, Extractor, ExtractReport
image cohorts      image_table, ImageTable, is_image_store (``featstore extract --images``)
errors             FeatstoreError and its subclasses in featstore.errors
=================  =========================================================================
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

from featstore.errors import FeatstoreError

try:
    __version__ = version("featstore")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "open_store": "featstore.store", "open_store_writer": "featstore.store", "StoreReader": "featstore.store",
    "StoreWriter": "featstore.store", "FeatureKey": "featstore.store",
    "Slide": "featstore.read.slide", "TilingConfig": "featstore.tiling", "Tiles": "featstore.tiling",
    "tile_slide": "featstore.tiling", "discover_slides": "featstore.cohort", "SlideRef": "featstore.cohort",
    "TileSource": "featstore.read.tilesource",
    "create_encoder": "featstore.encoders", "list_encoders": "featstore.encoders",
    "get_spec": "featstore.encoders", "parse_levels": "featstore.encoders", "Encoder": "featstore.encoders",
    "WeightsTag": "featstore.tags",
    "save_encoder": "featstore.checkpoint", "read_encoder_checkpoint": "featstore.checkpoint",
    "file_sha256": "featstore.checkpoint", "file_tag": "featstore.checkpoint",
    "ExtractConfig": "featstore.config", "Extractor": "featstore.extract", "ExtractReport": "featstore.extract",
    "image_table": "featstore.read.images", "ImageTable": "featstore.read.images", "is_image_store": "featstore.read.images",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'featstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["FeatstoreError", "__version__", *_EXPORTS]
