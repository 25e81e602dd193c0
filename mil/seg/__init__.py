"""Segmentation transfer: pixel-level tasks on image/mask pairs (docs/segmentation.md).

Modules:

- ``mil.seg.errors``   SegError, the one exception type of the package
- ``mil.seg.data``     image/mask pair discovery, exact mask loading and validation (binary,
  multiclass, instance), SegData
- ``mil.seg.metrics``  Dice, IoU, pixel accuracy; GlaS object Dice and AJI on instance masks;
  per-image means with bootstrap CIs
- ``mil.seg.annotations``  QuPath GeoJSON and label-TIFF annotations of whole slides, pairing
- ``mil.seg.wsi``      annotated whole slides cut into patches at a target mpp (WsiSegData)
- ``mil.seg.model``    segmentation models on the toolkit's encoders (segmentation-models-pytorch)
- ``mil.seg.train``    training and evaluation of those models (splits by slide for WSI patches)
- ``mil.seg.run``      one run end to end (datasets, train, in- and out-of-domain scores, run folder)
- ``mil.seg.compare``, ``mil.seg.predict``, ``mil.seg.pictures``  tables, applying a run, overlays

Synthetic gland images with exact instance masks come from ``featstore.synth.gland_image``.
"""
