"""analysis: CKA, probes, run comparison and the records table of patch / segmentation runs,
over featstore stores and run folders (it imports featstore only, below mil)."""
