"""mil: tasks over featstore embeddings.

Attention multiple-instance learning on slides (this package's modules: splits, bags, heads,
training, runs, top-k fine-tuning), and beside it the tile-level tasks :mod:`mil.patches` (patch
classification) and :mod:`mil.seg` (segmentation transfer); :mod:`mil.study` runs a whole study
from one YAML file on top of them all.
"""
