"""analysis: CKA, probes, statistics and run comparison over featstore stores and mil runs."""
