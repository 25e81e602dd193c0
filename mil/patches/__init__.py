"""Patch (tile-level) classification: the array-level building blocks.

Every function takes plain numpy arrays (features ``X``, integer labels ``y``, class names,
group ids, split names) and returns plain results, so the store readers, the commands and the
study can be built on top without this package reading stores itself.

* :mod:`mil.patches.errors`       ``PatchError``, the package's one error type
* :mod:`mil.patches.splits`       grouped, stratified train/val/test splits; nested training fractions
* :mod:`mil.patches.metrics`      accuracy, balanced accuracy, macro P/R/F1, confusion, AUC, bootstrap CIs
* :mod:`mil.patches.calibration`  max-softmax confidence, ECE, reliability bins, temperature scaling, plots
* :mod:`mil.patches.probe`        logistic-regression (C sweep) and kNN (k sweep) probes chosen on val
* :mod:`mil.patches.finetune`     end-to-end fine-tuning of an encoder + linear head on patch images

Run records are tabled by :mod:`analysis.records` (mean ± sd over seeds, Welch p vs a baseline
init, plots). docs/patches.md describes the definitions (ECE binning, temperature scaling, split algorithms).
"""
