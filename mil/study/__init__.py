"""mil.study: the whole transfer-learning study from one YAML file (extract -> MIL -> compare ->
fine-tune -> CKA -> report) in three forms (slides, ``task: patch``, ``task: segmentation``) behind
one runner protocol (:mod:`mil.study.base`, :mod:`mil.study.forms`), and the demo. The top floor:
it drives featstore, analysis, mil and the tasks."""
