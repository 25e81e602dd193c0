"""`featstore view`: a local web viewer of a store's slides, with a run's attention over them.

:func:`mil.viewer.app.create_app` builds the Flask app: the slide list (labels, predictions,
metrics), deep-zoom tiles of each slide (``openslide.deepzoom``), the attention heatmap as an
overlay image, the tissue tiles and the top-k tiles; OpenSeadragon (BSD-3, pinned, shipped in
``static/openseadragon``) draws them in the browser.
"""
