"""study: the whole transfer-learning study from one YAML file (extract -> MIL -> compare ->
fine-tune -> CKA -> report), and the demo. The top layer: it drives featstore, mil and analysis."""
