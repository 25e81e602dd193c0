"""Reading pixels: whole-slide images, their native tiles, image cohorts and remote stores.

=================  =========================================================================
slide              Slide: the OpenSlide reader (mpp, levels, patches at a target size)
native             the slide's own JPEG tiles (tifffile probe, TileCache): open_slide(reader=)
jpeg               JPEG tables and markers of native tiles
devicedecode       batched nvJPEG decode on a torch device (CPU runs the same code)
prefetch           one-ahead prefetch on a thread
tilesource         TileSource: thread-pooled patches at a store's coords, file fingerprints
images             image cohorts (ImageFolder / CSV) read like slides; image_table
remote             fsspec locations and storage options (s3://)
=================  =========================================================================

The names most users need are re-exported by :mod:`featstore` (``Slide``, ``TileSource``,
``image_table``, ...).
"""
